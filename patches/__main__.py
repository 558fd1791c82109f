"""``python -m patches``: see :mod:`patches.cli`."""
import sys

from patches.cli import main

sys.exit(main())
