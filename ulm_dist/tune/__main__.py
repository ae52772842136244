"""`python -m ulm_dist.tune`: see `sweep.py`."""

import sys

from ulm_dist.tune.sweep import main

sys.exit(main())
