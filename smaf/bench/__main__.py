"""``python -m smaf.bench`` (``bash script/bench.sh``): see :mod:`smaf.bench.cli`."""
import sys

from .cli import main

sys.exit(main())
