"""``python -m krypton_fx``: the same command as ``krypton-fx``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
