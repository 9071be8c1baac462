"""refresher: isolated PostgreSQL databases loaded with exactly the market data a task needs."""

from refresher.errors import RefresherError
from refresher.segments import Segment

__all__ = ["RefresherError", "Segment"]
__version__ = "0.1.0"
