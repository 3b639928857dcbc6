"""``python -m bitpet``: see :mod:`bitpet.cli`."""

import sys

from bitpet.cli import main

if __name__ == "__main__":
    sys.exit(main())
