"""``python -m miles``: the ``miles`` command line."""

import sys

from miles.cli import main

sys.exit(main())
