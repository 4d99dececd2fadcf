"""``python -m edsmart.devstack run`` or ``python -m edsmart.devstack test [pytest args]``."""

import sys

from edsmart.devstack.cli import main

if __name__ == "__main__":
    sys.exit(main())
