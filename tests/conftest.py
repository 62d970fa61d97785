"""Shared fixtures: `backend_name` runs a test on every runtime of `tests.fakes.BACKENDS`."""

import pytest

from tests.fakes import BACKENDS


@pytest.fixture(scope="module", params=BACKENDS)
def backend_name(request):
    """The runtime a backend-level test runs on (load with `tests.fakes.load_on`)."""
    return request.param
