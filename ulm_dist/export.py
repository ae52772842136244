"""`python -m ulm_dist.export`: see `deploy/export.py`."""

import sys

from ulm_dist.deploy.export import main

if __name__ == "__main__":
    sys.exit(main())
