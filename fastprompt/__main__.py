"""`python -m fastprompt ...`: the command line (see fastprompt.cli)."""

import sys

from fastprompt.cli import main

if __name__ == "__main__":
    sys.exit(main())
