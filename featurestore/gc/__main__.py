"""``python -m featurestore.gc``: the same command as ``featurestore gc``."""

import sys

from featurestore.gc import main

sys.exit(main(prog="python -m featurestore.gc"))
