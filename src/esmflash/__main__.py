"""`python -m esmflash ...`: the same command line as the `esmflash` script."""

import sys

from esmflash.cli import main

if __name__ == "__main__":
    sys.exit(main())
