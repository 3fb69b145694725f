"""``python -m kasched``: the kasched command."""

import sys

from kasched.cli import main

sys.exit(main())
