"""Iterators that work ahead: host batches made by a background thread, and batches sent to the
devices one step ahead of the step that uses them.

Each iterator stops whatever is working for it (a thread, grain's worker processes) when it is
closed, garbage-collected or left open at exit: a thread still reading a data set's files while
the interpreter shuts down aborted the process (`terminate called without an active exception`).
"""

from __future__ import annotations

import collections
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import jax


class _Failure:
    """An exception of the producer, handed to the consumer, which raises it."""

    def __init__(self, error: Exception):
        self.error = error


def _stop(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    thread.join()


class Background(Iterator[Any]):
    """make(start), make(start + 1), ... made by a thread `ahead` items ahead of the consumer.

    The thread stops and is joined at `close()`, when the iterator is garbage-collected, or at
    exit (before the interpreter tears down what the thread may be using). An exception of
    `make` is raised by `next`.
    """

    def __init__(self, make: Callable[[int], Any], start: int, ahead: int = 2):
        items: queue.Queue = queue.Queue(maxsize=ahead)
        self._items = items
        stop = threading.Event()

        # The thread's closures hold the queue and the event, never `self`: the iterator can
        # still be collected, which stops the thread.
        def put(item: Any) -> None:
            while not stop.is_set():
                try:
                    items.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def produce(index: int) -> None:
            try:
                while not stop.is_set():
                    put(make(index))
                    index += 1
            except Exception as error:  # raised again by the consumer
                put(_Failure(error))

        thread = threading.Thread(target=produce, args=(start,), daemon=True,
                                  name="jaxdiff-data")
        thread.start()
        self._finalizer = weakref.finalize(self, _stop, stop, thread)

    def __next__(self) -> Any:
        if not self._finalizer.alive:
            raise StopIteration
        item = self._items.get()
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        """Stops and joins the thread; idempotent."""
        self._finalizer()


class _Prefetched(Iterator[Any]):
    def __init__(self, source: Iterator[Any], put: Callable[[Any], Any], size: int):
        self._source, self._put = source, put
        self._ready: collections.deque = collections.deque()
        self._size = size

    def __next__(self) -> Any:
        while len(self._ready) <= self._size:
            self._ready.append(self._put(next(self._source)))
        return self._ready.popleft()

    def close(self) -> None:
        """Drops the transferred items and closes the source."""
        self._ready.clear()
        close = getattr(self._source, "close", None)
        if close is not None:
            close()


def prefetch_to_device(source: Iterator[Any], sharding: jax.sharding.Sharding,
                       size: int = 2) -> Iterator[Any]:
    """The items of `source` (pytrees of this process's host arrays) placed with `sharding`,
    `size` items ahead: transfers are asynchronous, so the next batches travel while the
    current step runs. `close()` closes `source`."""

    def put(tree: Any) -> Any:
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)

    return _Prefetched(source, put, size)
