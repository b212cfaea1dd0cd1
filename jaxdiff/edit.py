"""`python -m jaxdiff.edit`: edit images with a trained workdir's model and write a PNG grid.

    python -m jaxdiff.edit --workdir runs/digits --task inpaint --input digits.npz \\
        --mask lower_half --output runs/digits/edits

Tasks (`TASKS`): `inpaint` (fill the pixels a named mask of `MASKS` leaves out), `restore` (the
images degraded by `--operator`, down-sampling by `--factor` or grey, then restored), `sdedit`
(the images as guides at `--strength`) and `interpolate` (consecutive pairs of images). The
input is an .npz whose `images` array (or only array) holds [N, H, W, C] in [-1, 1] or uint8.
Each row of the grid is one input: the input, the masked or degraded input, and
`--num_samples` results (interpolate: the path from one image of the pair to the other). The
results are also written as `<task>.npz`. Every argument is checked before the model is read
and nothing is written before the results exist; an output inside a workdir that a live
training run holds is refused (`jaxdiff.workdir.check_not_held`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import zipfile
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import checkpoint, editing, operators, pictures
from jaxdiff.registry import lookup
from jaxdiff.workdir import WorkdirError, check_not_held


def _half(axis: int, keep_first: bool) -> Callable[[tuple[int, ...]], np.ndarray]:
    def mask(shape: tuple[int, ...]) -> np.ndarray:
        h, w, c = shape
        index = np.arange((h, w)[axis]) < (h, w)[axis] // 2
        keep = index if keep_first else ~index
        m = keep[:, None] if axis == 0 else keep[None, :]
        return np.broadcast_to(m[..., None], (h, w, c)).astype(np.float32)
    return mask


def _centre(shape: tuple[int, ...]) -> np.ndarray:
    h, w, c = shape
    m = np.ones((h, w, c), np.float32)
    m[h // 4:h - h // 4, w // 4:w - w // 4] = 0.0
    return m


# Named masks (1 = known pixel, kept; 0 = generated), for one image's [H, W, C].
MASKS: dict[str, Callable[[tuple[int, ...]], np.ndarray]] = {
    "lower_half": _half(0, True), "upper_half": _half(0, False),
    "right_half": _half(1, True), "left_half": _half(1, False), "centre": _centre}


@dataclasses.dataclass(frozen=True)
class Task:
    """What a task runs on the model: (args, model, images, rng) -> the grid's rows [N, K, ...]
    (the input, the masked or degraded input, the results; interpolate: the path)."""

    run: Callable


def _inpaint(args, model, images, rng):
    mask = MASKS[args.mask](model.image_shape)
    out = [editing.inpaint(model, key, images, mask, args.method, **_sampling(args))
           for key in jax.random.split(rng, args.num_samples)]
    return jnp.stack([images, images * mask, *out], 1)


def _restore(args, model, images, rng):
    op = operators.make_operator(args.operator, images.shape, factor=args.factor)
    y = op.apply(jnp.asarray(images))
    out = [editing.restore(model, key, y, args.operator, factor=args.factor,
                           method=args.method, **_sampling(args))
           for key in jax.random.split(rng, args.num_samples)]
    return jnp.stack([images, op.pinv(y), *out], 1)


def _sdedit(args, model, images, rng):
    out = [editing.edit(model, key, images, args.strength, args.sampler or "ddim",
                        num_steps=args.num_steps)
           for key in jax.random.split(rng, args.num_samples)]
    return jnp.stack([images, images, *out], 1)


def _interpolate(args, model, images, rng):
    del rng
    return editing.interpolate(model, images[0::2], images[1::2], num=args.num_samples,
                               num_steps=args.num_steps or 50)


TASKS: dict[str, Task] = {"inpaint": Task(_inpaint), "restore": Task(_restore),
                          "sdedit": Task(_sdedit), "interpolate": Task(_interpolate)}


def _sampling(args) -> dict:
    return {"sampler": args.sampler, "num_steps": args.num_steps}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxdiff.edit", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--task", required=True, help=f"one of {tuple(TASKS)}")
    p.add_argument("--input", required=True, help=".npz with `images` [N, H, W, C]")
    p.add_argument("--output", required=True, help="directory for <task>.png and <task>.npz")
    p.add_argument("--mask", default="lower_half", help=f"inpaint: one of {tuple(MASKS)}")
    p.add_argument("--method", default=None, help="inpaint/restore: one of "
                   f"{tuple(editing.EDIT_METHODS)} (default repaint / ddnm)")
    p.add_argument("--operator", default="downsample",
                   help=f"restore: one of {tuple(operators.OPERATORS)}")
    p.add_argument("--factor", type=int, default=2, help="restore: the down-sampling factor")
    p.add_argument("--strength", type=float, default=0.6, help="sdedit: in [0, 1]")
    p.add_argument("--sampler", default=None, help="the sampler (default the method's)")
    p.add_argument("--num_steps", type=int, default=None)
    p.add_argument("--num_samples", type=int, default=3,
                   help="results per input (interpolate: points on each path)")
    p.add_argument("--num_images", type=int, default=8, help="the first N images of --input")
    p.add_argument("--seed", type=int, default=0)
    return p


def _read_images(path: str, num: int) -> np.ndarray:
    if not os.path.isfile(path):
        raise ValueError(f"--input {path!r} is not a file")
    try:
        with np.load(path) as f:
            names = list(f.keys())
            images = f["images"] if "images" in names else (f[names[0]] if len(names) == 1
                                                             else None)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # truncated or not npz
        raise ValueError(f"--input {path!r} is not an .npz file ({e})") from None
    if images is None:
        raise ValueError(f"--input {path!r} holds {names}, none named 'images'")
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 127.5 - 1.0
    return np.asarray(images[:num], np.float32)


def check_args(args: argparse.Namespace) -> np.ndarray:
    """Every check that needs no model; returns the input images."""
    lookup(TASKS, args.task, "task")
    if args.task == "inpaint":
        lookup(MASKS, args.mask, "mask")
    if args.task == "restore":
        lookup(operators.OPERATORS, args.operator, "operator")
    if args.method is not None:
        lookup(editing.EDIT_METHODS, args.method, "editing method")
    if args.task == "interpolate" and args.num_images < 2:
        raise ValueError(f"interpolate needs pairs of images, got --num_images={args.num_images}")
    for name in ("num_samples", "num_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not os.path.isdir(args.workdir):
        raise ValueError(f"--workdir {args.workdir!r} is not a directory")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise ValueError(f"--output {args.output!r} is a file, not a directory")
    check_not_held(args.output)
    images = _read_images(args.input, args.num_images)
    if args.task == "interpolate":
        images = images[:len(images) // 2 * 2]
    return images


def main(argv: Sequence[str] | None = None) -> str:
    """Runs the command; returns the path of the PNG grid."""
    args = _parser().parse_args(argv)
    if args.method is None:
        args.method = "ddnm" if args.task == "restore" else "repaint"
    try:
        images = check_args(args)
        model = checkpoint.load(args.workdir)
        rows = np.asarray(TASKS[args.task].run(args, model, images, jax.random.key(args.seed)))
    except (ValueError, FileNotFoundError, WorkdirError) as e:
        sys.exit(f"jaxdiff.edit: {e}")
    os.makedirs(args.output, exist_ok=True)
    np.savez(os.path.join(args.output, f"{args.task}.npz"), inputs=images, rows=rows)
    path = pictures.save_grid(rows.reshape(-1, *rows.shape[2:]),
                              os.path.join(args.output, f"{args.task}.png"), nrow=rows.shape[1])
    print(f"written to {path}")
    return path


class _Command(types.ModuleType):
    """Importing this module rebinds the attribute `jaxdiff.edit` from the function
    `editing.edit` to the module: calling the module is calling the function, so
    `jaxdiff.edit(model, rng, guide)` works whichever of the two it names."""

    def __call__(self, *args, **kwargs):
        return editing.edit(*args, **kwargs)


sys.modules[__name__].__class__ = _Command

if __name__ == "__main__":
    main()
