"""sCM's adaptive double normalisation (arXiv 2410.11081 Sec. 4.1) measured on the digits: sCT
and sCD with the digits U-Net's three ways of conditioning on time, in one run.

    .venv/bin/python benchmarks/scm_norm.py runs/scm_norm

The time embedding reaches each residual block as an added bias (the DDPM U-Net's, the digits
configs' default), as ADM's AdaGN norm(h) * (1 + s) + b (`model.use_scale_shift_norm`), or as
sCM's adaptive double normalisation norm(h) * pnorm(s) + pnorm(b) (`model.adaptive_double_norm`).
sCT (digits_sct.py) trains each from scratch at seeds 0 and 1; sCD (digits_scd.py) distils a
TrigFlow teacher (digits_trigflow.py) of the same network, trained first. Every model is trained
by the documented command in a process of its own (wall time in ROOT/times.json; a rerun reuses
what is recorded) and scored as few_step.py scores: class-conditional samples, digits FID against
the training digits and label accuracy, the consistency models at 1 step (sigma = 80) and sCM's 2
steps (t_max, t = 1.1), the teachers by Heun-18 (35 network calls). Results go to
benchmarks/results/scm_norm.json.
"""

from __future__ import annotations

import json
import os

import few_step
from common import table, write_results
from few_step import score, train, trained_steps, workdir_of

import jaxdiff
from jaxdiff import digits_scorer, scm

NORMS = {"added": (), "AdaGN": ("model.use_scale_shift_norm=True",),
         "double": ("model.use_scale_shift_norm=True", "model.adaptive_double_norm=True")}
SCT_SEEDS = (0, 1)
# name: (config, teacher's name, --config overrides); teachers before their students.
MODELS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {}
for norm, fields in NORMS.items():
    for seed in SCT_SEEDS:
        MODELS[f"sCT {norm} seed {seed}"] = ("digits_sct.py", None, (*fields, f"seed={seed}"))
    MODELS[f"teacher {norm}"] = ("digits_trigflow.py", None, fields)
    MODELS[f"sCD {norm}"] = ("digits_scd.py", f"teacher {norm}", fields)
COLUMNS = (("model", "model", ""), ("nfe", "network calls", "d"),
           ("digits_fid", "digits FID", ".2f"), ("label_accuracy", "label acc", ".3f"),
           ("train_steps", "training steps", "d"), ("train_s", "training s", ".0f"))


def run(root: str, num_samples: int, batch_size: int, seed: int, cache_dir: str) -> dict:
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "times.json")
    times = json.load(open(path)) if os.path.exists(path) else {}
    for name, (config, teacher, overrides) in MODELS.items():
        if name not in times:
            train(root, name, times, config, teacher, overrides)
    classifier = digits_scorer.load_classifier(cache_dir)
    rows = []
    for name in MODELS:
        workdir = workdir_of(root, name)
        bundle = jaxdiff.load(workdir)
        methods = ((("heun", {"num_steps": 18}, 35),) if name.startswith("teacher") else
                   (("consistency", {"sigmas": (80.0,)}, 1),
                    ("consistency", {"sigmas": scm.sampling_sigmas(2, bundle.sigma_data)}, 2)))
        for method, options, nfe in methods:
            row = {"model": name, "nfe": nfe, "train_steps": trained_steps(workdir),
                   "train_s": times[name],
                   **score(bundle, method, options, classifier, num_samples, batch_size, seed)}
            rows.append(row)
            print(table([row], COLUMNS).splitlines()[-1], flush=True)
    print(f"\nsCT and sCD by time conditioning, {num_samples} samples each (seed {seed})")
    print(table(rows, COLUMNS))
    payload = {"num_samples": num_samples, "seed": seed, "results": rows}
    print("wrote", write_results("scm_norm", payload))
    return payload


if __name__ == "__main__":
    few_step.main(run, __doc__)
