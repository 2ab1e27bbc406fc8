"""``python -m prefalign``: the same command line as the ``prefalign`` script."""

import sys

from .cli import main

sys.exit(main())
