"""tfds image sets: their native shapes, and a split's examples by index as uint8, decoded from
its records each time or once into the memory-mapped cache of `data_cache`."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from jaxdiff import data_cache

Loader = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """An image data set in tensorflow-datasets: its native image and labels."""

    height: int
    width: int
    channels: int
    num_classes: int  # 0: the data set has no class labels
    center_crop: int | None = None  # square crop taken before resizing


TFDS_DATASETS = {
    "cifar10": ImageSpec(32, 32, 3, 10),
    "mnist": ImageSpec(28, 28, 1, 10),
    "fashion_mnist": ImageSpec(28, 28, 1, 10),
    "svhn_cropped": ImageSpec(32, 32, 3, 10),
    # The central 140x140 face, as score_sde and DDPM's CelebA pipelines take it.
    "celeb_a": ImageSpec(218, 178, 3, 0, center_crop=140),
}


def resize(image: np.ndarray, spec: ImageSpec, size: int) -> np.ndarray:
    if spec.center_crop is not None:
        c = spec.center_crop
        top, left = (spec.height - c) // 2, (spec.width - c) // 2
        image = image[top : top + c, left : left + c]
    if image.shape[:2] == (size, size):
        return image
    pil = Image.fromarray(image[..., 0] if spec.channels == 1 else image)
    resized = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC))
    return resized.reshape(size, size, spec.channels)


@dataclasses.dataclass(frozen=True)
class Decoder:
    """Records of a tfds data source by index -> (uint8 images [n, size, size, C], int32 labels);
    picklable, for grain's worker processes."""

    source: Any
    spec: ImageSpec
    image_size: int

    def __call__(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        records = [self.source[int(i)] for i in indices]
        images = np.stack([resize(r["image"], self.spec, self.image_size) for r in records])
        labels = np.array([r.get("label", 0) for r in records], np.int32)
        return images, labels


@dataclasses.dataclass(frozen=True)
class Indexer:
    """Examples by index from arrays in memory (or memory-mapped): a gather."""

    images: np.ndarray
    labels: np.ndarray

    def __call__(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]


def open_split(
    name: str, split: str, image_size: int, data_dir: str | None, memory_budget_mb: float,
    cache_dir: str | None, random_flip: bool,
) -> tuple[int, Loader, Loader | None, bool]:
    """(examples, loader, loader of the mirrored examples where they are stored, whether the
    loader decodes each batch from the records)."""
    import tensorflow_datasets as tfds  # imported here so `import jaxdiff` stays light

    # tfds picks array_record, the random-access format data_source reads, only when neither
    # data_dir nor builder_kwargs is given; otherwise it would prepare TFRecords it cannot read.
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        # Offline, tfds retries each download with growing waits for minutes before it fails,
        # saying nothing: say it first.
        print(f"jaxdiff: {name} is not prepared in {builder.data_dir}: downloading and "
              f"preparing it (once). Without network access tfds retries the download for "
              f"several minutes before it fails: then prepare it where there is one and give "
              f"its directory as --config.data.data_dir", file=sys.stderr, flush=True)
    source = tfds.data_source(name, split=split, data_dir=data_dir,
                              builder_kwargs={"file_format": "array_record"})
    spec = TFDS_DATASETS[name]
    decode = Decoder(source, spec, image_size)
    shape = (len(source), image_size, image_size, spec.channels)
    # Both orientations are touched when batches are flipped at random.
    if np.prod(shape) * (2 if random_flip else 1) > memory_budget_mb * 2**20:
        return len(source), decode, None, True
    key = {"dataset": name, "split": split, "image_size": image_size,
           "dataset_version": str(builder.version), "tfds": tfds.__version__,
           "num_examples": len(source)}
    safe_split = re.sub(r"[^\w.-]", "_", split)  # e.g. 'train[:90%]'
    parent = (os.path.join(builder.data_dir, "jaxdiff-decoded") if cache_dir is None else
              os.path.join(cache_dir, name, str(builder.version)))
    directory = os.path.join(parent, f"{safe_split}-{image_size}px")
    images, mirrored, labels = data_cache.decoded(directory, key, shape, decode)
    return len(source), Indexer(images, labels), Indexer(mirrored, labels), False
