"""``python -m compir`` is the same as the ``compir`` console script."""

import sys

from compir.cli import main

sys.exit(main())
