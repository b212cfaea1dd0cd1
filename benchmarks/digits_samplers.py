"""Samplers on the embedded digits models at equal network calls: for each diffusion model
(DDPM `digits.py`, EDM `digits_edm.py`, flow matching `digits_fm.py`: one network, one training
length) `heun`, `ddim`, `dpm_solver++` and `euler` at budgets of 10, 20 and 35 network calls
(Heun at N levels makes 2N - 1: 5, 10 and 18 levels), DDIM-50 as the consistency teacher's
reference; consistency models (digits_cd.py, digits_ict.py) at one and two steps (CM Alg. 1,
levels 80 and 80, 0.821); all scored by the digits FID. `--bpd` adds each diffusion model's
bits/dim on the test digits: the ODE likelihood (`jaxdiff.likelihood`, RK4, 32 steps,
Hutchinson) for every model and DDPM's variational bound.

    .venv/bin/python -m jaxdiff.train --config experiments/digits.py --workdir runs/digits
    .venv/bin/python -m jaxdiff.train --config experiments/digits_edm.py --workdir runs/digits_edm
    .venv/bin/python -m jaxdiff.train --config experiments/digits_fm.py --workdir runs/digits_fm
    .venv/bin/python -m jaxdiff.train --config experiments/digits_cd.py --workdir runs/digits_cd \
        --config.distill.teacher=runs/digits
    .venv/bin/python -m jaxdiff.train --config experiments/digits_ict.py --workdir runs/digits_ict
    .venv/bin/python benchmarks/digits_samplers.py runs/digits runs/digits_edm runs/digits_fm \
        runs/digits_cd runs/digits_ict --bpd 200

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
from jaxdiff import digits_scorer, evaluate, likelihood, parameterisations
from jaxdiff.data import digits_arrays

# (method, options, network calls): Heun's last step into sigma = 0 is an Euler step (EDM Alg. 2).
BUDGETS = (10, 20, 35)
METHODS = tuple((method, {"num_steps": steps}, nfe)
                for budget in BUDGETS
                for method, steps, nfe in (("heun", (budget + 1) // 2, budget - 1 + budget % 2),
                                           ("ddim", budget, budget),
                                           ("dpm_solver++", budget, budget),
                                           ("euler", budget, budget))) \
    + (("ddim", {"num_steps": 50}, 50),)
CONSISTENCY_METHODS = (("consistency", {"sigmas": (80.0,)}, 1),
                       ("consistency", {"sigmas": (80.0, 0.821)}, 2))
COLUMNS = (("model", "model", ""), ("method", "method", ""), ("steps", "steps", "d"),
           ("nfe", "NFE", "d"), ("digits_fid", "digits FID", ".2f"),
           ("fid_at_test_size", "FID @ test size", ".2f"),
           ("label_accuracy", "label acc", ".3f"), ("seconds_per_1000", "s / 1000", ".3f"))
BPD_COLUMNS = (("model", "model", ""), ("bpd_vlb", "bits/dim (VLB)", ".3f"),
               ("bpd_ode", "bits/dim (ODE)", ".3f"), ("bpd_ode_sem", "+-", ".3f"))


def bits_per_dim(workdir: str, bundle, num_examples: int, seed: int) -> dict:
    """The first test digits' bits/dim: the ODE likelihood for every model (each label given),
    DDPM's variational bound where the process has steps."""
    x, y = digits_arrays("test")
    x, y = x[:num_examples], y[:num_examples]
    labels = y if bundle.num_classes else None
    ode = likelihood.bits_per_dim_ode(bundle, x, jax.random.key(seed), labels=labels,
                                      solver="rk4", num_steps=32,
                                      divergence="hutchinson")["bpd"]
    row = {"model": workdir, "bpd_ode": float(ode.mean()),
           "bpd_ode_sem": float(ode.std(ddof=1) / np.sqrt(len(ode)))}
    if bundle.schedule.num_timesteps is not None:
        row["bpd_vlb"] = evaluate.dataset_bits_per_dim(bundle, x, labels,
                                                       jax.random.key(seed))["total_bpd"]
    return row


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


def best_at_budget(rows: list[dict]) -> list[dict]:
    """Per diffusion model and budget of BUDGETS, the row of the lowest digits FID."""
    best = {}
    for row in rows:
        budget = next((b for b in BUDGETS if b - 1 <= row.get("nfe", -1) <= b), None)
        key = (row["model"], budget)
        if budget is not None and (key not in best
                                   or row["digits_fid"] < best[key]["digits_fid"]):
            best[key] = {**row, "budget": budget}
    return list(best.values())


def run(workdirs: list[str], num_samples: int, batch_size: int, seed: int,
        cache_dir: str, bpd_examples: int) -> dict:
    classifier = digits_scorer.load_classifier(cache_dir)
    test_x, test_y = digits_arrays("test")
    test_fid = digits_scorer.fid(classifier, test_x)
    rows = [{"model": "real test digits", "fid_at_test_size": test_fid,
             "label_accuracy": float(np.mean(digits_scorer.predict(classifier, test_x)
                                             == test_y))}]
    bpd_rows = []
    for workdir in workdirs:
        bundle = jaxdiff.load(workdir)
        consistency = not parameterisations.get(bundle.model_output_type).denoises
        if bpd_examples and not consistency:
            bpd_rows.append(bits_per_dim(workdir, bundle, bpd_examples, seed))
            print(table(bpd_rows[-1:], BPD_COLUMNS).splitlines()[-1], flush=True)
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
    best = best_at_budget(rows)
    print("\nThe best sampler of each model at each budget of network calls")
    print(table(best, (("budget", "budget", "d"),) + COLUMNS))
    if bpd_rows:
        print(f"\nBits/dim of the first {bpd_examples} test digits")
        print(table(bpd_rows, BPD_COLUMNS))
    payload = {"num_samples": num_samples, "seed": seed, "results": rows, "best": best,
               "bits_per_dim": bpd_rows}
    print("wrote", write_results("digits_samplers", payload))
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="trained digits workdirs")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=evaluate.DEFAULT_CACHE_DIR)
    parser.add_argument("--bpd", type=int, default=0, metavar="N",
                        help="also the bits/dim of the first N test digits (0: none)")
    args = parser.parse_args()
    run(args.workdirs, args.num_samples, args.batch_size, args.seed, args.cache_dir, args.bpd)


if __name__ == "__main__":
    main()
