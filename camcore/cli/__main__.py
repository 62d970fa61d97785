"""``python -m camcore.cli``."""

import sys

from . import main

sys.exit(main())
