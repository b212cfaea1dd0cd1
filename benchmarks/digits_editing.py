"""Editing the held-out digits with the `make demo` model (`jaxdiff.editing`): for each task and
method, the share of completed digits the digits classifier gives their true label ("label
kept"), the digits FID of the completed digits, network calls per image and the wall time per
1000 images of a second, compiled run.

    .venv/bin/python benchmarks/digits_editing.py runs/digits [--num_steps 50]

Tasks, on the 297 test digits: inpainting the lower half (the mask `lower_half` of
`python -m jaxdiff.edit`), 2x super-resolution (4x4 block means -> 8x8), and SDEdit from the
4x4 block means up-sampled (a "sketch"). Baselines: the real digits, and samples of the null
label with no observation (what the label would be by chance, about 0.1). Every method runs
the 400-step chain respaced to `--num_steps` levels (RePaint: jump 5, 5 resamplings), the null
label (no guidance), x_0 clipped. Results go to benchmarks/results/digits_editing.json.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from common import table, write_results

import jaxdiff
from jaxdiff import digits_scorer, inverse, operators
from jaxdiff.data import digits_arrays
from jaxdiff.edit import MASKS


def timed(fn):
    """(result of a second call, its seconds): the first compiles."""
    fn()
    start = time.perf_counter()
    out = np.asarray(fn())
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("--num_steps", type=int, default=50)
    p.add_argument("--cache_dir", default="benchmarks/results")
    args = p.parse_args()
    model = jaxdiff.load(args.workdir)
    classifier = digits_scorer.load_classifier(args.cache_dir)
    x, labels = digits_arrays("test")
    n, steps = len(x), args.num_steps
    rng = jax.random.key(0)
    mask = MASKS["lower_half"](model.image_shape)
    down = operators.make_operator("downsample", x.shape, factor=2)
    y = np.asarray(down.apply(x))
    repaint = {"jump_length": 5, "resamplings": 5}
    repaint_calls = int(np.sum(np.diff(inverse.repaint_schedule(steps, 5, 5)) < 0))
    runs = {
        ("real digits", "-"): (lambda: x, 0),
        ("no observation", "ddpm"): (lambda: jaxdiff.sample(
            model, rng, "ddpm", num_samples=n, num_steps=steps,
            labels=np.full(n, model.num_classes)), steps),
    }
    for method, options, calls in (("replace", {}, steps), ("repaint", repaint, repaint_calls),
                                   ("ddnm", {}, steps), ("dps", {"scale": 1.0}, 2 * steps)):
        runs[("inpaint lower half", method)] = (
            lambda m=method, o=options: jaxdiff.inpaint(model, rng, x, mask, m, num_steps=steps,
                                                        **o), calls)
    for method, options, calls in (("replace", {}, steps), ("ddnm", {}, steps),
                                   ("dps", {"scale": 1.0}, 2 * steps)):
        runs[("2x super-resolution", method)] = (
            lambda m=method, o=options: jaxdiff.restore(model, rng, y, "downsample", factor=2,
                                                        method=m, num_steps=steps, **o), calls)
    sketch = np.asarray(down.pinv(y))
    for strength in (0.3, 0.5, 0.7):
        runs[("SDEdit from 4x4 means", f"ddim, strength {strength}")] = (
            lambda s=strength: jaxdiff.edit(model, rng, sketch, s, "ddim", num_steps=steps),
            round(strength * steps))
    rows = []
    for (task, method), (fn, calls) in runs.items():
        images, seconds = timed(fn)
        kept = float(np.mean(digits_scorer.predict(classifier, images) == labels))
        fid = digits_scorer.fid(classifier, images)
        per_1000 = seconds / n * 1000 if calls else 0.0
        rows.append({"task": task, "method": method, "kept": kept, "fid": fid,
                     "calls": calls, "seconds": per_1000})
        print(rows[-1], flush=True)
    print(table(rows, [("task", "task", ""), ("method", "method", ""),
                       ("kept", "label kept", ".2f"), ("fid", "digits FID", ".1f"),
                       ("calls", "network calls", "d"), ("seconds", "s / 1000", ".1f")]))
    write_results("digits_editing", {"num_steps": steps, "rows": rows})


if __name__ == "__main__":
    main()
