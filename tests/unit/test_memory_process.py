"""Start-up objects are frozen, so finished requests' reference cycles are collected soon."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: freezing is process-wide, and the point is what the server's
# imports (hundreds of thousands of objects) do to the collector's schedule.
SCRIPT = """
import gc, sys, weakref
import inference_svc.model.modular  # torch and transformers, as the server loads them
from inference_svc.process_memory import freeze_startup_objects

class Finished:  # a request whose streamer and callback refer to each other
    def __init__(self):
        self.callback = lambda: self

frozen = freeze_startup_objects()
left = len(gc.get_objects(generation=2))  # what a full collection must now walk
refs = []
for _ in range(20_000):
    request = Finished()
    refs.append(weakref.ref(request))
    del request
    work = [[] for _ in range(20)]  # the allocations that drive automatic collections
print(frozen, left, sum(ref() is not None for ref in refs))
"""


def test_freezing_startup_objects_lets_the_full_collection_reach_request_cycles():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, check=True,
                            capture_output=True, text=True, timeout=300)
    frozen, left, alive = (int(n) for n in result.stdout.split())
    assert frozen > 100_000  # the imports' objects left the collector's view
    assert left < 1_000  # so the next full collection is due after few survivors
    assert alive < 5_000  # full collections ran and freed the cycles as they went
