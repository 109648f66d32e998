"""``python -m rdl_functional`` is ``rdl-train``."""

import sys

from .apps.cli import main

sys.exit(main())
