"""Batches decoded by grain's worker processes, for data sets too large to decode once and keep.

Element s of the grain data set is the batch of step s (`Dataset.batch(s)`, a pure function of
the seed and s), so the workers change only who computes a batch, never which batch comes: any
number of workers, and a run resumed at any step, see the batches one process would have made.
grain's `mp_prefetch` gives worker i the steps i, i + n, ... and reads them back in order.
"""

from __future__ import annotations

import gc
import os
import sys
import weakref
from collections.abc import Callable, Iterator

import numpy as np

PER_WORKER_BUFFER = 2  # batches each worker makes ahead


def machine_workers() -> int:
    """The worker processes this machine can run beside training: its usable cores less one
    for the training process, at least one."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def _close(holder: list) -> None:
    """Closes grain's iterator and frees it (and the reference cycles among its parts) while
    the interpreter is whole: freed during shutdown, each part closes itself again then and
    fails on the modules already torn down."""
    holder.pop().close()
    gc.collect()


class GrainBatches(Iterator[dict[str, np.ndarray]]):
    """make(start), make(start + 1), ... made by `num_workers` grain worker processes.

    The workers stop at `close()`, when the iterator is garbage-collected, or at exit. Batches
    are copied out of grain's shared memory, which is then released at once.
    """

    def __init__(self, make: Callable[[int], dict[str, np.ndarray]], start: int,
                 num_workers: int):
        import grain
        from absl import flags

        # grain reads its absl flags in the workers' setup: a program that parsed none (a test,
        # a notebook) would fail there (google/grain#1355, #1360).
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        steps = grain.MapDataset.range(start, sys.maxsize).map(make)
        # One thread per worker: a batch is already a whole element, and the workers are the
        # parallelism.
        steps = steps.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
        steps = steps.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=PER_WORKER_BUFFER))
        # The only reference to grain's iterator, so that closing can free it.
        self._holder = [iter(steps)]
        self._finalizer = weakref.finalize(self, _close, self._holder)

    def __next__(self) -> dict[str, np.ndarray]:
        if not self._finalizer.alive:
            raise StopIteration
        return {k: np.array(v) for k, v in next(self._holder[0]).items()}

    def close(self) -> None:
        """Stops the workers; idempotent."""
        self._finalizer()
