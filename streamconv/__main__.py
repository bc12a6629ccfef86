"""`python -m streamconv ...`: the same command line as the `streamconv` script."""
from .cli import main

if __name__ == "__main__":
    main()
