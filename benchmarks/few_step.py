"""Few-step generators on the digits, trained and scored in one run: the diffusion teachers
(DDPM `digits.py`, EDM `digits_edm.py`, TrigFlow `digits_trigflow.py`) at DDIM-50 and Heun-18,
and every few-step method at its own configs' training length: CD (from the DDPM teacher), iCT
and sCT (no teacher), sCD (from the TrigFlow teacher), ECT and progressive distillation (from the
EDM teacher; rounds 16 -> 8 -> 4 -> 2 -> 1 steps). Each model is trained here, one after the
other, by the documented command (`python -m jaxdiff.train` / `jaxdiff.progressive`) in a
process of its own, and its wall time is recorded in ROOT/times.json; a rerun reuses a model
whose time is recorded (so an interrupted run goes on) and trains the rest.

    .venv/bin/python benchmarks/few_step.py runs/few_step

Scoring is `digits_samplers.py`'s: class-conditional samples (label i mod 10, no guidance), the
digits FID against the training digits, the classifier's label accuracy and the seconds per 1000
samples of a second, compiled draw. Consistency-type models sample with `consistency` at 1, 2
and 4 steps: one step from sigma = 80 (CM Alg. 1); two at CM's (80, 0.821), sCM's (80,
sigma_d tan 1.1) for the TrigFlow models (sCM App. G); four at EDM's rho = 7 levels of a 4-step
grid (80, 17.5, 2.52, 0.17). PD rounds sample by DDIM on their own grids. Training wall time
counts the whole command (start-up and compiling included); teachers' times are listed on their
rows and not added to their students'. Results go to benchmarks/results/few_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from common import ROOT, table, write_results
from digits_samplers import draw

import jaxdiff
from jaxdiff import digits_scorer, evaluate, processes, scm
from jaxdiff.data import digits_arrays

KARRAS_4 = tuple(float(s) for s in processes.karras_sigmas(4, 0.002, 80.0))
CM_2 = (80.0, 0.821)


def _consistency(two_steps: tuple[float, ...] | None) -> tuple:
    """1, 2 and 4 steps; two_steps None: sCM's, read off the model's sigma_data."""
    return (("consistency", {"sigmas": (80.0,)}, 1), ("consistency", {"sigmas": two_steps}, 2),
            ("consistency", {"sigmas": KARRAS_4}, 4))


TEACHER_METHODS = (("ddim", {"num_steps": 50}, 50), ("heun", {"num_steps": 18}, 35))
# name: (config, teacher, how it samples); in training order (teachers first).
MODELS: dict[str, tuple[str, str | None, tuple]] = {
    "DDPM teacher": ("digits.py", None, TEACHER_METHODS[:1]),
    "EDM teacher": ("digits_edm.py", None, TEACHER_METHODS),
    "TrigFlow teacher": ("digits_trigflow.py", None, TEACHER_METHODS),
    "CD": ("digits_cd.py", "DDPM teacher", _consistency(CM_2)),
    "iCT": ("digits_ict.py", None, _consistency(CM_2)),
    "sCT": ("digits_sct.py", None, _consistency(None)),
    "sCD": ("digits_scd.py", "TrigFlow teacher", _consistency(None)),
    "ECT": ("digits_ect.py", "EDM teacher", _consistency(CM_2)),
    "PD": ("digits_pd.py", "EDM teacher", ()),
}
COLUMNS = (("model", "model", ""), ("method", "method", ""), ("nfe", "network calls", "d"),
           ("digits_fid", "digits FID", ".2f"), ("label_accuracy", "label acc", ".3f"),
           ("train_steps", "training steps", "d"), ("train_s", "training s", ".0f"),
           ("seconds_per_1000", "s / 1000 samples", ".3f"))


def workdir_of(root: str, name: str) -> str:
    return os.path.join(root, name.lower().replace(" ", "_"))


def train(root: str, name: str, times: dict, config: str | None = None,
          teacher: str | None = None, overrides: tuple[str, ...] = ()) -> None:
    """Trains MODELS[name] (or `config` with `teacher`'s workdir and `--config.` `overrides`)
    into its workdir by the documented command, timing it into ROOT/times.json."""
    if config is None:
        config, teacher, _ = MODELS[name]
    module = "jaxdiff.progressive" if name == "PD" else "jaxdiff.train"
    cmd = [sys.executable, "-m", module, "--config", os.path.join(ROOT, "experiments", config),
           "--workdir", workdir_of(root, name), *(f"--config.{o}" for o in overrides)]
    if teacher is not None:
        cmd.append(f"--config.distill.teacher={workdir_of(root, teacher)}")
    print(" ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    times[name] = time.perf_counter() - start
    with open(os.path.join(root, "times.json"), "w") as f:
        json.dump(times, f, indent=1)


def trained_steps(workdir: str) -> int:
    from jaxdiff import checkpoint
    return int(checkpoint.latest_step(workdir))


def score(bundle, method: str, options: dict, classifier, num_samples: int, batch_size: int,
          seed: int) -> dict:
    draw(bundle, method, options, batch_size, batch_size, seed)  # compiles
    start = time.perf_counter()
    samples, labels = draw(bundle, method, options, num_samples, batch_size, seed)
    seconds = time.perf_counter() - start
    return {"method": method, "digits_fid": digits_scorer.fid(classifier, samples),
            "label_accuracy": float(np.mean(digits_scorer.predict(classifier, samples)
                                            == labels)),
            "seconds_per_1000": seconds * 1000 / num_samples}


def run(root: str, num_samples: int, batch_size: int, seed: int, cache_dir: str) -> dict:
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "times.json")
    times = json.load(open(path)) if os.path.exists(path) else {}
    for name in MODELS:
        if name not in times:
            train(root, name, times)
    classifier = digits_scorer.load_classifier(cache_dir)
    rows = []
    for name, (_, _, methods) in MODELS.items():
        workdir = workdir_of(root, name)
        if name == "PD":
            rounds = json.load(open(os.path.join(workdir, "rounds.json")))["rounds"]
            runs = [(os.path.join(workdir, r["workdir"]), "ddim", r["num_steps"]) for r in rounds]
            steps = sum(r["trained_steps"] for r in rounds)
        else:
            runs, steps = [(workdir, None, None)], trained_steps(workdir)
        for path_k, pd_method, pd_steps in runs:
            bundle = jaxdiff.load(path_k)
            if pd_method is not None:
                saved = json.load(open(os.path.join(path_k, "config.json")))["sampling"]
                methods = ((pd_method, {"sigmas": tuple(saved["sigmas"])}, pd_steps),)
            for method, options, nfe in methods:
                if name == "PD" and nfe not in (1, 2, 4):
                    continue
                if options.get("sigmas", ()) is None:
                    options = {"sigmas": scm.sampling_sigmas(2, bundle.sigma_data)}
                row = {"model": name, "nfe": nfe, "train_steps": steps, "train_s": times[name],
                       **score(bundle, method, options, classifier, num_samples, batch_size,
                               seed)}
                rows.append(row)
                print(table([row], COLUMNS).splitlines()[-1], flush=True)
    print(f"\nFew-step generators on the digits, {num_samples} samples each (seed {seed})")
    print(table(rows, COLUMNS))
    best = {nfe: min((r for r in rows if r["nfe"] == nfe), key=lambda r: r["digits_fid"])
            for nfe in (1, 2)}
    for nfe, row in best.items():
        print(f"best at {nfe} network call(s): {row['model']} (digits FID "
              f"{row['digits_fid']:.2f})")
    test_x, _ = digits_arrays("test")
    payload = {"num_samples": num_samples, "seed": seed, "results": rows,
               "real_test_digits_fid": digits_scorer.fid(classifier, test_x),
               "best": {str(k): v["model"] for k, v in best.items()}}
    print("wrote", write_results("few_step", payload))
    return payload


def main(run=run, doc: str = __doc__) -> None:
    """Parses the command line (a root and the scoring's options) and calls `run` with it."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("root", help="directory for the trained workdirs and times.json")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=evaluate.DEFAULT_CACHE_DIR)
    args = parser.parse_args()
    run(args.root, args.num_samples, args.batch_size, args.seed, args.cache_dir)


if __name__ == "__main__":
    main()
