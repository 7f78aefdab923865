"""Two stages of a stream of batches on two cores: the caller's thread produces batch i + 1 while one
worker thread consumes batch i.

A layer's capture is such a stream: producing a batch (its im2col patches, targets and activation
responses: numpy gathers and one product) and consuming it (the Gram and cross moments: BLAS) take
about as long each, and both release the GIL. Items are consumed one at a time and in order, so the
sums are the very ones a plain loop makes; at most two items are alive at once (the one being
consumed and the one just produced).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Optional, TypeVar

T = TypeVar("T")


def overlapped(items: Iterable[T], consume: Callable[[T], None], enabled: bool = True) -> None:
    """consume(item) for every item, in order, on one worker thread while the next item is produced
    here (in this thread, one after the other, when not `enabled`). An exception in either stage
    propagates once the other stage's current item is done."""
    if not enabled:
        for item in items:
            consume(item)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxzip-consume") as worker:
        pending: Optional[Future] = None
        for item in items:
            if pending is not None:
                pending.result()
            pending = worker.submit(consume, item)
        if pending is not None:
            pending.result()
