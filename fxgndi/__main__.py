"""``python -m fxgndi``: the same as the ``fxgndi`` command."""

import sys

from fxgndi.app.cli import main

sys.exit(main())
