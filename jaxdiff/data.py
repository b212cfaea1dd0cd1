"""Input pipelines: tfds image sets, scikit-learn's 8x8 digits and 2-D toy distributions.

Every batch is a pure function of (seed, step): the examples of step s are positions
s*B .. s*B+B-1 of an endless stream that walks a fresh permutation of the data set each epoch
(drawn from (seed, epoch)), and random flips come from (seed, step). A run resumed at step s
therefore sees exactly the data it would have seen. Each process loads only its own shard of the
global batch, shaped [local_devices, per_device, ...] (the blocks of the training mesh's
devices, `sharding.batch_sharding`); batches are numpy arrays.

tfds images travel as uint8 NHWC, a quarter of float32's bytes, and become float32 in [-1, 1]
inside the compiled step (`to_float`); the digits and 2-D points are float32 already. A tfds
split (`tfds_images`) whose decoded images fit `data.memory_budget_mb` is decoded once into a
memory-mapped uint8 array beside the tfds data (`data_cache`) and batched by indexing it; a
larger one (CelebA) is decoded batch by batch in grain's worker processes (`grain_source`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxdiff.grain_source import GrainBatches, machine_workers
from jaxdiff.prefetch import Background
from jaxdiff.registry import Checker, Entry, is_int, lookup
from jaxdiff.tfds_images import TFDS_DATASETS, Loader, open_split

DIGITS_SIZE = 8
DIGITS_TEST_EXAMPLES = 297  # the last 297 of the 1797 digits; the first 1500 train

# 'gmm': eight equal Gaussians on a ring; radius sqrt(2) gives each coordinate variance ~1.
GMM_MEANS = np.sqrt(2.0) * np.stack(
    [np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], axis=1
).astype(np.float32)
GMM_STD = 0.1
# Affine maps raw -> normalised points (raw - center) / scale, so each coordinate has std ~1.
MOONS_CENTER, MOONS_SCALE = np.array([0.5, 0.25]), np.array([0.868, 0.497])
SWISS_ROLL_CENTER, SWISS_ROLL_SCALE = np.array([2.0, 0.2]), 6.8
CHECKERBOARD_SCALE = 2.0 / np.sqrt(3.0)  # std of U[-2, 2]

# Tags that keep the random streams of permutations, flips and toy points apart.
_PERMUTATION, _FLIP, _TOY = 0, 1, 2


def _generator(*words: int) -> np.random.Generator:
    """A numpy Generator seeded by integers; negative seeds wrap to 64 bits."""
    return np.random.default_rng([int(w) & 0xFFFFFFFFFFFFFFFF for w in words])


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    permutation = _generator(_PERMUTATION, seed, epoch).permutation(num_examples)
    permutation.flags.writeable = False  # shared by every caller of the cache
    return permutation


# ---------------------------------------------------------------------------------------------
# 2-D toy distributions.


def _as_generator(rng_or_seed: Any) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    if isinstance(rng_or_seed, (int, np.integer)):
        return _generator(rng_or_seed)
    key = rng_or_seed
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return _generator(*np.asarray(key, dtype=np.uint32).ravel())


def _gmm(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(GMM_MEANS), n).astype(np.int32)
    return GMM_MEANS[labels] + GMM_STD * rng.standard_normal((n, 2)), labels


def _moons(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    theta = rng.uniform(0.0, np.pi, n)
    upper = rng.random(n) < 0.5
    arc = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    raw = np.where(upper[:, None], arc, np.array([1.0, 0.5]) - arc)
    raw += 0.05 * rng.standard_normal((n, 2))
    return (raw - MOONS_CENTER) / MOONS_SCALE, np.zeros(n, np.int32)


def _swiss_roll(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    t = 1.5 * np.pi * (1.0 + 2.0 * rng.random(n))
    raw = np.stack([t * np.cos(t), t * np.sin(t)], axis=1)
    raw += 0.25 * rng.standard_normal((n, 2))
    return (raw - SWISS_ROLL_CENTER) / SWISS_ROLL_SCALE, np.zeros(n, np.int32)


def _checkerboard(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    # Uniform on the 8 squares of [-2, 2]^2 where floor(x) + floor(y) is even.
    x = rng.uniform(-2.0, 2.0, n)
    y = rng.random(n) - 2.0 * rng.integers(0, 2, n) + np.floor(x) % 2
    return np.stack([x, y], axis=1) / CHECKERBOARD_SCALE, np.zeros(n, np.int32)


@dataclasses.dataclass(frozen=True)
class ToyDistribution:
    """A 2-D toy distribution: `sample(rng, n)` -> (points, labels); its number of classes."""

    sample: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]
    num_classes: int = 0


TOY_DISTRIBUTIONS: dict[str, ToyDistribution] = {
    "gmm": ToyDistribution(_gmm, num_classes=len(GMM_MEANS)),  # labelled by its component
    "moons": ToyDistribution(_moons),
    "swiss_roll": ToyDistribution(_swiss_roll),
    "checkerboard": ToyDistribution(_checkerboard),
}


def toy2d_sample(name: str, rng_or_seed: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n points of a 2-D toy distribution: (float32 [n, 2], int32 labels [n]).

    `rng_or_seed` is a numpy Generator, an int seed or a JAX PRNG key. Labels are the mixture
    component for 'gmm' and 0 elsewhere. Points are normalised to roughly unit scale.
    """
    distribution = lookup(TOY_DISTRIBUTIONS, name, "toy distribution")
    points, labels = distribution.sample(_as_generator(rng_or_seed), n)
    return points.astype(np.float32), labels


def to_float(x: Any) -> Any:
    """Examples as networks take them: uint8 pixels p as p / 127.5 - 1 in float32 (DDPM arXiv
    2006.11239 Sec. 4); float examples (digits, 2-D points) as they are. numpy or jax arrays:
    the training step calls it first, so that hosts send bytes.

    Written (2p - 255) / 255, whose numerator is exact: XLA divides by a constant as a product
    with its reciprocal, and p / 127.5 - 1 then maps 255 to 1 + 2^-23; this form keeps -1 and 1
    exact and every value within 2^-23 of p / 127.5 - 1."""
    if x.dtype == np.uint8:
        return (x.astype(np.float32) * 2.0 - 255.0) / 255.0
    return x


# ---------------------------------------------------------------------------------------------
# Finite data sets: a `Loader` from example indices to (images, labels) as stored: uint8 pixels
# for tfds sets (`tfds_images`), float32 in [-1, 1] for the digits.

def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits of a split, scaled to [-1, 1], NHWC, with their labels."""
    from sklearn.datasets import load_digits  # scikit-learn loads slowly; only digits needs it

    digits = load_digits()
    x = (digits.images / 16.0 * 2.0 - 1.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)
    cut = len(x) - DIGITS_TEST_EXAMPLES
    return (x[:cut], y[:cut]) if split == "train" else (x[cut:], y[cut:])


# ---------------------------------------------------------------------------------------------


class Dataset:
    """Global batches of a data set, each a pure function of (seed, step); this process's shard.

    Attributes: `num_examples` (0 for toy2d, whose points are drawn afresh every step),
    `example_shape` ((H, W, C) or (2,)), `num_classes` (label values are 0..num_classes-1;
    0 means the labels are all 0), `num_workers` (the grain worker processes `iterate` runs;
    0: one background thread).
    """

    def __init__(
        self,
        *,
        num_examples: int,
        example_shape: tuple[int, ...],
        num_classes: int,
        batch_size: int,
        seed: int,
        random_flip: bool,
        num_devices: int,
        process_index: int,
        process_count: int,
        load: Loader | None = None,
        load_mirrored: Loader | None = None,
        toy_distribution: str | None = None,
        num_workers: int = 0,
    ):
        self.num_examples = num_examples
        self.example_shape = example_shape
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.seed = seed
        self.random_flip = random_flip
        self.local_devices = num_devices // process_count
        self.per_device = batch_size // num_devices
        self._shard = slice(
            process_index * self.local_devices * self.per_device,
            (process_index + 1) * self.local_devices * self.per_device,
        )
        self._load = load
        self._load_mirrored = load_mirrored
        self._toy_distribution = toy_distribution
        self.num_workers = num_workers

    def global_indices(self, step: int) -> np.ndarray:
        """Example indices of the whole global batch of `step` (int64 [batch_size])."""
        if self._load is None:
            raise ValueError("toy2d draws fresh points every step; it has no example indices")
        positions = step * self.batch_size + np.arange(self.batch_size)
        epochs, offsets = np.divmod(positions, self.num_examples)
        indices = np.empty(self.batch_size, np.int64)
        for epoch in range(epochs[0], epochs[-1] + 1):  # consecutive: no np.unique's sort
            here = epochs == epoch
            indices[here] = _epoch_permutation(self.seed, int(epoch), self.num_examples)[
                offsets[here]
            ]
        return indices

    def examples(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Examples by index, unflipped and unsharded, as networks take them (`to_float`):
        {"x": float32 [n, *shape] in [-1, 1], "label": [n]}."""
        if self._load is None:
            raise ValueError("toy2d has no stored examples; use toy2d_sample")
        x, label = self._load(np.asarray(indices))
        return {"x": to_float(x), "label": label}

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's shard of the global batch of `step`, as stored.

        {"x": [local_devices, per_device, *example_shape] (uint8 pixels for tfds images,
               float32 in [-1, 1] otherwise: `to_float` makes both float32),
         "label": int32 [local_devices, per_device]}
        """
        if self._load is None:
            x, label = toy2d_sample(
                self._toy_distribution, _generator(_TOY, self.seed, step), self.batch_size
            )
            x, label = x[self._shard], label[self._shard]
        else:
            indices = self.global_indices(step)[self._shard]
            x, label = self._load(indices)
            if self.random_flip:  # x is a fresh array: its chosen rows are replaced
                flip = (_generator(_FLIP, self.seed, step).random(self.batch_size) < 0.5
                        )[self._shard]
                # A stored mirror image is a gather; reversing W in place costs ~10x more.
                x[flip] = (x[flip, :, ::-1] if self._load_mirrored is None else
                           self._load_mirrored(indices[flip])[0])
        shape = (self.local_devices, self.per_device)
        return {
            "x": x.reshape(shape + self.example_shape),
            "label": label.astype(np.int32).reshape(shape),
        }

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """batch(start_step), batch(start_step + 1), ...: made two ahead by a background thread,
        or by `num_workers` grain processes. `close()` it (or let it go: it is closed when
        collected, and at exit) to stop them."""
        if self.num_workers:
            return GrainBatches(self.batch, start_step, self.num_workers)
        return Background(self.batch, start_step)


def check_data_fields(c: Checker) -> None:
    """The rules of `config.data` that every data set shares, against its data set's entry."""
    dataset = c.get("data.dataset")
    source = DATASETS[dataset]
    c.integer("data.image_size", 1)
    what = "the point dimension" if source.points else "the image channels"
    c.check("data.channels", lambda v: v == source.channels,
            f"{dataset} has {source.channels} ({what})")
    c.boolean("data.random_flip")
    known = source.classes(c.config.data)
    if c.integer("data.num_classes", 0) and c.get("data.num_classes") > 0 and known is not None:
        c.check("data.num_classes", lambda v: v == known,
                f"{dataset} has {known} classes (or 0 to ignore the labels)")


def data_errors(config: ml_collections.ConfigDict) -> list[str]:
    """Every problem of `config.data` alone (the rules of its data set), one line each."""
    c = Checker(config)
    if c.one_of("data.dataset", tuple(DATASETS)):
        check_data_fields(c)
        DATASETS[config.data.dataset].check(c)
    return c.errors


def _check(config: ml_collections.ConfigDict, split: str, num_devices: int) -> list[str]:
    """Every problem with config.data (`data_errors`: its data set's rules), the split and the
    batch size, one line each."""
    errors = data_errors(config)
    splits = DATASETS[config.data.dataset].splits if not errors else None
    if splits is not None and split not in splits:
        errors.append(f"split = {split!r}: {config.data.dataset} has the splits {splits}")
    batch_size = config.training.batch_size
    if not (isinstance(batch_size, int) and batch_size >= 1 and batch_size % num_devices == 0):
        errors.append(f"config.training.batch_size = {batch_size!r}: must be a positive multiple "
                      f"of the device count {num_devices}")
    return errors


def create_dataset(
    config: ml_collections.ConfigDict,
    split: str = "train",
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Dataset:
    """The data set config.data names, batched as config.training.batch_size over all devices.

    `split` is a tfds split ('train', 'test', ...; for digits 'train' or 'test'). Process index
    and count default to JAX's; tests pass others to simulate several hosts on one machine.
    Raises one ValueError naming every invalid field.
    """
    num_devices = jax.device_count()
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count or num_devices % process_count:
        raise ValueError(f"process {process_index} of {process_count} cannot take an equal "
                         f"share of {num_devices} devices")
    errors = _check(config, split, num_devices)
    if errors:
        lines = "\n".join(f"  - {e}" for e in errors)
        raise ValueError(f"invalid data config ({len(errors)} problem(s)):\n{lines}")

    data = config.data
    common = dict(
        batch_size=config.training.batch_size,
        seed=config.seed,
        random_flip=data.random_flip,
        num_devices=num_devices,
        process_index=process_index,
        process_count=process_count,
        num_classes=DATASETS[data.dataset].classes(data),
    )
    return DATASETS[data.dataset].open(data, split, common)


def _open_toy2d(data: ml_collections.ConfigDict, split: str, common: dict) -> Dataset:
    return Dataset(num_examples=0, example_shape=(2,), toy_distribution=data.toy_distribution,
                   **common)


def _open_finite(num_examples: int, load: Loader, data: ml_collections.ConfigDict, split: str,
                 common: dict) -> Dataset:
    if num_examples == 0:
        raise ValueError(f"config.data.dataset = {data.dataset!r}: split {split!r} is empty")
    shape = (data.image_size, data.image_size, data.channels)
    return Dataset(num_examples=num_examples, example_shape=shape, load=load, **common)


def _open_digits(data: ml_collections.ConfigDict, split: str, common: dict) -> Dataset:
    images, labels = digits_arrays(split)

    def load(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return images[indices], labels[indices]

    return _open_finite(len(images), load, data, split, common)


def _open_tfds(name: str, data: ml_collections.ConfigDict, split: str, common: dict
               ) -> Dataset:
    num_examples, load, mirrored, streamed = open_split(
        name, split, data.image_size, data.data_dir, data.memory_budget_mb, data.cache_dir,
        data.random_flip)
    if streamed:
        workers = machine_workers() if data.num_workers is None else data.num_workers
        how = (f"{workers} grain worker process(es) (this machine's "
               f"{len(os.sched_getaffinity(0))} cores less one for training)"
               if data.num_workers is None else
               f"{workers} grain worker process(es) (data.num_workers)" if workers else
               "a background thread (data.num_workers = 0)")
        print(f"jaxdiff: {name} {split} decodes above data.memory_budget_mb = "
              f"{data.memory_budget_mb}: its batches are decoded by {how}", file=sys.stderr,
              flush=True)
        common = {**common, "num_workers": workers}
    return _open_finite(num_examples, load, data, split, {**common, "load_mirrored": mirrored})


def _check_digits(c: Checker) -> None:
    c.check("data.image_size", lambda v: v == DIGITS_SIZE,
            f"digits are {DIGITS_SIZE}x{DIGITS_SIZE}; set image_size = {DIGITS_SIZE}")


def _check_toy2d(c: Checker) -> None:
    c.one_of("data.toy_distribution", tuple(TOY_DISTRIBUTIONS))
    c.check("data.random_flip", lambda v: v is False, "toy2d points cannot be flipped")


def _toy_classes(data: ml_collections.ConfigDict) -> int | None:
    """The classes of `data.toy_distribution` (None while it names none: `_check_toy2d` says)."""
    distribution = TOY_DISTRIBUTIONS.get(data.get("toy_distribution"))
    return None if distribution is None else distribution.num_classes


def _check_tfds(c: Checker) -> None:
    c.check("data.data_dir", lambda v: v is None or isinstance(v, str), "must be None or a path")
    c.check("data.cache_dir", lambda v: v is None or (isinstance(v, str) and v != ""),
            "must be None or a path")
    c.number("data.memory_budget_mb", 0.0, float("inf"))
    c.check("data.num_workers", lambda v: v is None or (is_int(v) and v >= 0),
            "must be None (from the machine) or an integer >= 0 (0: a thread, no processes)")


# What every tfds data set reads. A split whose uint8 images take at most memory_budget_mb MiB is
# decoded once into cache_dir (None: beside the tfds data, which must then be a local, writable
# directory) and memory-mapped (cifar10's train split: 150 MiB at 32x32; CelebA's at 64x64,
# 1.9 GiB, is not); a larger one is decoded by `num_workers` grain processes (None: as many as
# the machine's cores less one).
TFDS_FIELDS = {"data.data_dir": ml_collections.config_dict.placeholder(str),
               "data.cache_dir": ml_collections.config_dict.placeholder(str),
               "data.memory_budget_mb": 1024.0,
               "data.num_workers": ml_collections.config_dict.placeholder(int)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Source(Entry):
    """A data set of `DATASETS`: its channels (a point's dimension), its classes given
    `config.data` (0: unlabelled; None: not known from it), whether its examples are points,
    its splits (None: any of tfds's), and `open(config.data, split, common)` -> the
    `Dataset`."""

    channels: int
    classes: Callable[[ml_collections.ConfigDict], int | None]
    open: Callable[[ml_collections.ConfigDict, str, dict], Dataset]
    points: bool = False
    splits: tuple[str, ...] | None = None


DATASETS: dict[str, Source] = {
    **{name: Source(channels=spec.channels, classes=lambda data, n=spec.num_classes: n,
                    open=functools.partial(_open_tfds, name), check=_check_tfds,
                    fields=TFDS_FIELDS)
       for name, spec in TFDS_DATASETS.items()},
    # scikit-learn's 8x8 digits: 1500 train and 297 test images (`digits_arrays`).
    "digits": Source(channels=1, classes=lambda data: 10, open=_open_digits,
                     splits=("train", "test"), check=_check_digits),
    # 2-D points of a toy distribution (`toy2d_sample`); 'gmm' is labelled by its components.
    "toy2d": Source(channels=2, points=True, open=_open_toy2d, check=_check_toy2d,
                    classes=_toy_classes,
                    fields={"data.toy_distribution": "gmm"}),
}


def get_dataset(name: str) -> Source:
    """The entry of data set `name`; a ValueError naming it and the choices if there is none."""
    return lookup(DATASETS, name, "data set")
