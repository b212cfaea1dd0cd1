"""The decoded cache: built once and memory-mapped, rebuilt when stale, never read half-written."""

import mmap
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxdiff import data, data_cache, tfds_images
from tests.test_data import make_config, mock_tfds

N = 12


class CountingDecoder:
    """tfds_images.Decoder, counting the examples it decodes."""

    def __init__(self, monkeypatch):
        self.decoded = 0
        real = tfds_images.Decoder.__call__

        def call(decoder, indices):
            self.decoded += len(indices)
            return real(decoder, indices)

        monkeypatch.setattr(tfds_images.Decoder, "__call__", call)


def open_cifar(tmp_path, **fields):
    return data.create_dataset(make_config("cifar10", batch_size=4, cache_dir=str(tmp_path),
                                           **fields))


def the_cache(tmp_path):
    return [p for p in (tmp_path / "cifar10" / "3.0.2").iterdir()]


def test_decoded_once_then_memory_mapped(tmp_path, monkeypatch):
    counter = CountingDecoder(monkeypatch)
    with mock_tfds(N):
        records = tfds.data_source("cifar10", split="train")
        first = open_cifar(tmp_path)
        assert counter.decoded == N
        again = open_cifar(tmp_path)
        assert counter.decoded == N  # read back, not decoded again
    (directory,) = the_cache(tmp_path)
    assert directory.name == "train-32px"
    images = again._load.images
    assert images.dtype == np.uint8 and images.shape == (N, 32, 32, 3)
    assert isinstance(images.base.base, mmap.mmap) and not images.flags.writeable
    np.testing.assert_array_equal(images, np.stack([records[i]["image"] for i in range(N)]))
    np.testing.assert_array_equal(again._load_mirrored.images, images[:, :, ::-1])
    np.testing.assert_array_equal(again._load.labels, [records[i]["label"] for i in range(N)])
    for step in (0, 5):
        np.testing.assert_array_equal(first.batch(step)["x"], again.batch(step)["x"])


def test_stale_caches_are_decoded_again(tmp_path, monkeypatch):
    counter = CountingDecoder(monkeypatch)
    with mock_tfds(N):
        open_cifar(tmp_path)
        open_cifar(tmp_path, image_size=16)  # another size: its own cache
        assert counter.decoded == 2 * N
        assert sorted(p.name for p in the_cache(tmp_path)) == ["train-16px", "train-32px"]
        monkeypatch.setattr(tfds, "__version__", "9.9.9")  # another tfds: stale
        ds = open_cifar(tmp_path, image_size=16)
        assert counter.decoded == 3 * N
    key = (the_cache(tmp_path)[0].parent / "train-16px" / "key.json").read_text()
    assert '"tfds": "9.9.9"' in key
    assert ds._load.images.shape == (N, 16, 16, 3)
    assert sorted(p.name for p in the_cache(tmp_path)) == ["train-16px", "train-32px"]


@pytest.mark.parametrize("dies", ["decoding", "renaming"])
def test_a_writer_that_dies_leaves_no_cache(dies, tmp_path, monkeypatch):
    """Whatever stops a writer before its rename, no reader sees its arrays: the next open
    decodes the split whole."""
    monkeypatch.setattr(data_cache, "CHUNK", 5)  # three chunks of 12 examples
    calls = []

    def broken_decode(decoder, indices):
        calls.append(indices)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(decoder, indices)

    def broken_rename(source, target):
        raise RuntimeError("killed")

    real = tfds_images.Decoder.__call__
    with mock_tfds(N):
        with monkeypatch.context() as m:
            if dies == "decoding":
                m.setattr(tfds_images.Decoder, "__call__", broken_decode)
            else:
                m.setattr(os, "rename", broken_rename)
            with pytest.raises(RuntimeError, match="killed"):
                open_cifar(tmp_path)
        assert the_cache(tmp_path) == [] or os.listdir(the_cache(tmp_path)[0]) == []
        # A writer killed outright leaves its temporary directory: it is never read.
        partial = tmp_path / "cifar10" / "3.0.2" / ".train-32px.partial-dead"
        partial.mkdir(parents=True)
        (partial / "key.json").write_text("{}")
        ds = open_cifar(tmp_path)
        records = tfds.data_source("cifar10", split="train")
        np.testing.assert_array_equal(ds._load.images[N - 1], records[N - 1]["image"])
