"""``python -m rdl_functional`` is ``rdl-train``."""

import sys

from .cli import main

sys.exit(main())
