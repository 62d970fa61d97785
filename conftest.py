"""pytest set-up for the whole repository (tests/ and the doctests of camcore/ and backends/).

`camcore.load` keeps its graph analysis in a disk cache (`backends.analysis_cache`): the
suite points it at a temporary folder of its own, so it never writes into the user's
home, starts cold and cannot reuse entries of another run.  It lives at the root, not in
tests/, because the doctests (`camcore.fuse`'s loads the embedded model) run too.
"""

import os
import shutil
import tempfile

_saved = {}


def pytest_configure(config):
    folder = tempfile.mkdtemp(prefix="camcore-test-cache-")
    _saved["folder"], _saved["previous"] = folder, os.environ.get("CAMCORE_CACHE_DIR")
    # os.environ, not monkeypatch: subprocesses (CLI tests, Ray workers) inherit it.
    os.environ["CAMCORE_CACHE_DIR"] = folder


def pytest_unconfigure(config):
    if "folder" not in _saved:
        return
    if _saved["previous"] is None:
        os.environ.pop("CAMCORE_CACHE_DIR", None)
    else:
        os.environ["CAMCORE_CACHE_DIR"] = _saved["previous"]
    shutil.rmtree(_saved.pop("folder"), ignore_errors=True)
