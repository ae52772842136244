"""`python -m ulm_dist.predict`: see `deploy/predict.py`."""

import sys

from ulm_dist.deploy.predict import main

if __name__ == "__main__":
    sys.exit(main())
