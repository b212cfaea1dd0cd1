"""Working ahead: the background thread stops however iteration ends; device prefetch keeps
`size` items in flight and hands them over placed as asked."""

import gc
import threading

import jax
import numpy as np
import pytest

from jaxdiff.prefetch import Background, prefetch_to_device


def data_threads():
    return [t for t in threading.enumerate() if t.name == "jaxdiff-data" and t.is_alive()]


@pytest.mark.parametrize("how", ["close", "collected"])
def test_the_thread_stops_however_iteration_ends(how):
    assert data_threads() == []
    made = []
    iterator = Background(lambda i: made.append(i) or i * i, start=5, ahead=2)
    assert [next(iterator) for _ in range(3)] == [25, 36, 49]
    assert len(data_threads()) == 1
    if how == "close":
        iterator.close()
        iterator.close()  # idempotent
        with pytest.raises(StopIteration):
            next(iterator)
    else:
        del iterator
        gc.collect()
    assert data_threads() == []
    assert made == list(range(5, 5 + len(made))) and len(made) <= 3 + 2 + 1  # at most 2 ahead


def test_prefetch_keeps_size_items_in_flight_and_places_them():
    pulled, closed = [], []

    def source():
        try:
            for i in range(10):
                pulled.append(i)
                yield {"x": np.full((2, 3), i, np.uint8)}
        finally:
            closed.append(True)

    mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:2]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    batches = prefetch_to_device(source(), sharding, size=1)
    first = next(batches)
    assert pulled == [0, 1]  # the next item is already on its way
    assert isinstance(first["x"], jax.Array) and first["x"].sharding == sharding
    np.testing.assert_array_equal(first["x"], np.zeros((2, 3), np.uint8))
    assert [int(next(batches)["x"][0, 0]) for _ in range(3)] == [1, 2, 3]
    assert pulled == [0, 1, 2, 3, 4]
    batches.close()
    assert closed == [True]
