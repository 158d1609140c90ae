"""`python -m esmflash ...`: the same command line as the `esmflash` script."""

from esmflash.cli import run

if __name__ == "__main__":
    run()
