"""``python -m capfaas``: the same as the ``capfaas`` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
