"""``python -m smaf.evaluate``: see :mod:`smaf.evaluate.cli`."""
import sys

from .cli import main

sys.exit(main())
