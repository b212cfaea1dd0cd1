"""Samplers on the embedded digits models: `heun` at 18 steps (35 network calls) against `ddim`
at 35 (and DDIM-50, the consistency teacher's reference) and `dpm_solver++` at 20, from the same
weights; consistency models (digits_cd.py, digits_ict.py) at one and two steps (CM Alg. 1, levels
80 and 80, 0.821); all scored by the digits FID.

    .venv/bin/python -m jaxdiff.train --config experiments/digits.py --workdir runs/digits
    .venv/bin/python -m jaxdiff.train --config experiments/digits_edm.py --workdir runs/digits_edm
    .venv/bin/python -m jaxdiff.train --config experiments/digits_cd.py --workdir runs/digits_cd \
        --config.distill.teacher=runs/digits
    .venv/bin/python -m jaxdiff.train --config experiments/digits_ict.py --workdir runs/digits_ict
    .venv/bin/python benchmarks/digits_samplers.py runs/digits runs/digits_edm runs/digits_cd \
        runs/digits_ict

Every method draws the same class-conditional samples (sample i has label i mod 10, no guidance,
x_0 clipped to [-1, 1]) in batches from the same keys. "digits FID" is
`jaxdiff.digits_scorer.fid` against the training digits; FID's bias grows as the sample
shrinks, so "FID @ test size" scores the first len(test digits) samples, the size at which the
real test digits (printed first) score the floor. "label acc" is the share of samples to which
the digits classifier gives their label. "s / 1000" is the wall time per 1000 samples of a
second, compiled draw (the same network costs the same per call, so a one-step model is
about NFE times faster). Results go to benchmarks/results/digits_samplers.json.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from common import table, write_results

import jaxdiff
from jaxdiff import digits_scorer, evaluate
from jaxdiff.data import digits_arrays

# (method, options, network calls): Heun's last step into sigma = 0 is an Euler step (EDM Alg. 2).
METHODS = (("heun", {"num_steps": 18}, 35), ("ddim", {"num_steps": 35}, 35),
           ("dpm_solver++", {"num_steps": 20}, 20), ("ddim", {"num_steps": 50}, 50))
CONSISTENCY_METHODS = (("consistency", {"sigmas": (80.0,)}, 1),
                       ("consistency", {"sigmas": (80.0, 0.821)}, 2))
COLUMNS = (("model", "model", ""), ("method", "method", ""), ("steps", "steps", "d"),
           ("nfe", "NFE", "d"), ("digits_fid", "digits FID", ".2f"),
           ("fid_at_test_size", "FID @ test size", ".2f"),
           ("label_accuracy", "label acc", ".3f"), ("seconds_per_1000", "s / 1000", ".3f"))


def draw(bundle, method: str, options: dict, num_samples: int, batch_size: int, seed: int):
    """num_samples samples of labels i mod num_classes, batch b from fold_in(key(seed), b)."""
    labels = np.arange(num_samples) % bundle.num_classes
    out = []
    for b, start in enumerate(range(0, num_samples, batch_size)):
        stop = min(start + batch_size, num_samples)
        out.append(np.asarray(jaxdiff.sample(
            bundle, jax.random.fold_in(jax.random.key(seed), b), method,
            num_samples=stop - start, labels=labels[start:stop], **options)))
    return np.concatenate(out), labels


def run(workdirs: list[str], num_samples: int, batch_size: int, seed: int,
        cache_dir: str) -> dict:
    classifier = digits_scorer.load_classifier(cache_dir)
    test_x, test_y = digits_arrays("test")
    test_fid = digits_scorer.fid(classifier, test_x)
    rows = [{"model": "real test digits", "fid_at_test_size": test_fid,
             "label_accuracy": float(np.mean(digits_scorer.predict(classifier, test_x)
                                             == test_y))}]
    for workdir in workdirs:
        bundle = jaxdiff.load(workdir)
        consistency = bundle.model_output_type == "consistency"
        for method, options, nfe in CONSISTENCY_METHODS if consistency else METHODS:
            draw(bundle, method, options, batch_size, batch_size, seed)  # compiles
            start = time.perf_counter()
            samples, labels = draw(bundle, method, options, num_samples, batch_size, seed)
            seconds = time.perf_counter() - start
            rows.append({
                "model": workdir, "method": method,
                "steps": options.get("num_steps", len(options.get("sigmas", ()))), "nfe": nfe,
                "digits_fid": digits_scorer.fid(classifier, samples),
                "fid_at_test_size": digits_scorer.fid(classifier, samples[:len(test_x)]),
                "label_accuracy": float(np.mean(digits_scorer.predict(classifier, samples)
                                                == labels)),
                "seconds_per_1000": seconds * 1000 / num_samples})
            print(table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    print(f"\nDigits samplers, {num_samples} samples each (seed {seed})")
    print(table(rows, COLUMNS))
    payload = {"num_samples": num_samples, "seed": seed, "results": rows}
    print("wrote", write_results("digits_samplers", payload))
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="trained digits workdirs")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=evaluate.DEFAULT_CACHE_DIR)
    args = parser.parse_args()
    run(args.workdirs, args.num_samples, args.batch_size, args.seed, args.cache_dir)


if __name__ == "__main__":
    main()
