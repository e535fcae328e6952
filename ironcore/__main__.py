"""`python -m ironcore CONFIG [overrides]` — the same entry as the `ironcore` console script."""

import sys

from ironcore.cli import main

sys.exit(main())
