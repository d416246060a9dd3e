"""``python -m fxgndi``: the same as the ``fxgndi`` command."""

import sys

from .cli import main

sys.exit(main())
