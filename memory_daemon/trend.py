"""Growth estimates over a short history of (time, used bytes) samples."""

import itertools
import math
from collections.abc import Sequence


def least_squares_slope(points: Sequence[tuple[float, float]]) -> float:
    """Slope of the least-squares line through the points (units of y per unit of x)."""
    count = len(points)
    if count < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / count
    mean_y = sum(y for _, y in points) / count
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def peak_rate(points: Sequence[tuple[float, float]]) -> float:
    """Fastest growth between two consecutive points; 0 when nothing grew."""
    rates = [(y2 - y1) / (x2 - x1) for (x1, y1), (x2, y2) in itertools.pairwise(points) if x2 > x1]
    return max([0.0, *rates])


def seconds_until(current: float, limit: float, rate: float) -> float:
    """Seconds until `current` reaches `limit` at `rate` per second (inf if never)."""
    if current >= limit:
        return 0.0
    if rate <= 0:
        return math.inf
    return (limit - current) / rate
