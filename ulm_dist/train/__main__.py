"""`python -m ulm_dist.train`: see `driver.py`."""

import sys

from ulm_dist.train.driver import main

sys.exit(main())
