"""`python -m ulm_dist.train`: see `driver.py`."""

import os
import sys

from ulm_dist.train.driver import INTERRUPTED_EXIT_CODE, main

code = main()
if code == INTERRUPTED_EXIT_CODE:
    # After Ctrl-C, Ray Train's fit() is still waiting in a daemon thread on the Ray session
    # that stop_workers() shut down; the interpreter's teardown of that thread can crash
    # (SIGSEGV, seen in CI) after everything is said. Everything has been reported and the
    # tracker closed by now, so the process leaves without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
