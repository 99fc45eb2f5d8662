"""``python -m lowdiff …`` (and ``torchrun … -m lowdiff …``): the same entry point as the ``lowdiff`` command."""

import sys

from lowdiff.cli import main

sys.exit(main())
