"""A data set split decoded once into uint8 arrays on disk, memory-mapped by every later run.

The arrays live in a directory beside the tfds data (`images.npy`, `mirrored.npy`: the same
images left-right mirrored, so that a random flip is a gather too, `labels.npy` and `key.json`,
which says what they were decoded from: data set, split, image size, the data set's and tfds'
versions, the number of examples). A directory whose key differs from the one asked for is
stale and decoded again. It is written under a temporary name and renamed into place when
complete, so a reader sees a whole cache or none, whatever happened to the writer.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

# What is decoded (crop, resize, layout) as of this version; a change makes every cache stale.
FORMAT = 1
CHUNK = 1024  # examples decoded at a time while building


def _read(directory: str, key: dict[str, Any]
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The cached arrays of `key`, or None when they are missing or stale."""
    try:
        with open(os.path.join(directory, "key.json")) as f:
            if json.load(f) != key:
                return None
        # Plain ndarray views of the maps: indexing them gives plain arrays, not np.memmap ones.
        images, mirrored = (np.load(os.path.join(directory, name), mmap_mode="r").view(np.ndarray)
                            for name in ("images.npy", "mirrored.npy"))
        labels = np.load(os.path.join(directory, "labels.npy"))
    except (OSError, ValueError):
        return None
    return images, mirrored, labels


def _write(directory: str, key: dict[str, Any], shape: tuple[int, ...],
           decode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    try:
        images, mirrored = (np.lib.format.open_memmap(os.path.join(temporary, name), mode="w+",
                                                      dtype=np.uint8, shape=shape)
                            for name in ("images.npy", "mirrored.npy"))
        labels = np.empty(shape[0], np.int32)
        for start in range(0, shape[0], CHUNK):
            chunk = np.arange(start, min(start + CHUNK, shape[0]))
            images[chunk], labels[chunk] = decode(chunk)
            mirrored[chunk] = images[chunk, :, ::-1]
        images.flush()
        mirrored.flush()
        del images, mirrored
        np.save(os.path.join(temporary, "labels.npy"), labels)
        with open(os.path.join(temporary, "key.json"), "w") as f:
            json.dump(key, f, indent=1)
        if os.path.exists(directory):  # stale: moved aside, then removed
            stale = tempfile.mkdtemp(prefix=f".{name}.stale-", dir=parent)
            os.replace(directory, os.path.join(stale, name))
            shutil.rmtree(stale)
        try:
            os.rename(temporary, directory)
        except OSError:
            if _read(directory, key) is None:  # not another process that finished first
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def decoded(directory: str, key: dict[str, Any], shape: tuple[int, ...],
            decode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 `shape` [n, H, W, C] and the same mirrored (W reversed), memory-mapped
    read-only; labels int32 [n]) of a split, from `directory` if it holds them for `key` (plus
    this module's FORMAT), else made by `decode(indices)` -> (uint8 images, labels) once and
    kept there."""
    key = {"format": FORMAT, **key}
    cached = _read(directory, key)
    if cached is None:
        print(f"jaxdiff: decoding {shape[0]} images once into {directory}", file=sys.stderr,
              flush=True)
        _write(directory, key, shape, decode)
        cached = _read(directory, key)
    return cached
