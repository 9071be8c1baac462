"""``python -m featurestore.gc``: the same command as ``featurestore gc``, ended as it is (``console.end``: an
answer lost on stdout is one line and status 2, not status 0)."""

from featurestore.console import end
from featurestore.gc import main

end(main(prog="python -m featurestore.gc"), None)
