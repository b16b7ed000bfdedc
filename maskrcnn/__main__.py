"""``python -m maskrcnn``: see maskrcnn/cli.py."""

import sys

from .cli import main

sys.exit(main())
