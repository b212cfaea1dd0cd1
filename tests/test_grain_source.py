"""grain's worker processes: the batches of one process, whatever the number of workers."""

import numpy as np
import pytest

from jaxdiff import data
from tests.test_data import make_config, mock_tfds


@pytest.mark.slow  # starts grain worker processes, each importing JAX and tfds: ~5-10 s each
@pytest.mark.parametrize("num_workers", [1, 2])
def test_workers_give_the_batches_of_one_process(num_workers, tmp_path):
    """Resumed at step 3, in two processes' shards: batch(s) as one process makes it."""
    with mock_tfds(24):
        shards = [data.create_dataset(
            make_config("cifar10", batch_size=8, random_flip=True, memory_budget_mb=0.0,
                        num_workers=num_workers, cache_dir=str(tmp_path)),
            process_index=p, process_count=2) for p in range(2)]
        iterators = [s.iterate(3) for s in shards]
        for step in range(3, 8):  # 24 / 8: step 3 starts the second epoch
            for shard, iterator in zip(shards, iterators, strict=True):
                batch, expected = next(iterator), shard.batch(step)
                for key in ("x", "label"):
                    assert batch[key].dtype == expected[key].dtype
                    np.testing.assert_array_equal(batch[key], expected[key])
        for iterator in iterators:
            iterator.close()
            with pytest.raises(StopIteration):
                next(iterator)

