"""`python -m ulm_dist.evaluate`: see `command.py`."""

import sys

from ulm_dist.evaluate.command import main

sys.exit(main())
