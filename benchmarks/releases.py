"""Two source trees of jaxdiff on the same hot paths, alternated in one run: before/after.

    .venv/bin/python benchmarks/releases.py OLD_TREE NEW_TREE [--rounds 3] [--calls 5]

(a tree is a checkout, e.g. `git worktree add /tmp/old <commit>`). Each round runs one worker
process per tree, in alternating order, so a shared machine's drift falls on both alike. A
worker imports jaxdiff from its tree and times, after compiling: draws of 16 digits samples
(`ddpm` over digits.py's 400-step chain, `ddim` 50, `dpm_solver++` 20, `heun` 18) from the
digits network with fresh weights, and the compiled training step (batch 64) of digits.py
(DDPM), digits_edm.py (EDM) and digits_ict.py (iCT). A row's time is the median of its calls;
"new / old" is the median over rounds of each round's ratio (below 1: the new tree is faster).
Results go to benchmarks/results/releases.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import ROOT, table, write_results

SAMPLERS = (("ddpm", 400), ("ddim", 50), ("dpm_solver++", 20), ("heun", 18))
STEPS = ("digits", "digits_edm", "digits_ict")


def worker(calls: int) -> dict[str, float]:
    """Median seconds per call of each row, for the jaxdiff importable from sys.path."""
    import importlib

    import jax
    import numpy as np

    import jaxdiff
    from jaxdiff import sharding, train
    from jaxdiff.bundle import DiffusionModel
    from jaxdiff.data import create_dataset
    from jaxdiff.models import create_model
    from jaxdiff.processes import make_process

    def timed(fn) -> float:
        jax.block_until_ready(fn())  # compiles
        seconds = []
        for _ in range(calls):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds)

    devices = jax.devices()[:1]
    key = jax.random.key(0)
    out = {}
    config = importlib.import_module("experiments.digits").get_config()
    params = train.train_functions(config, devices).init_state(key).params
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    bundle = DiffusionModel(params=params, schedule=make_process(config.diffusion),
                            model=create_model(config), image_shape=shape,
                            model_output_type=config.diffusion.model_output,
                            model_var_type=config.diffusion.model_var_type,
                            num_classes=config.data.num_classes)
    labels = np.arange(16) % 10
    for method, steps in SAMPLERS:
        out[f"sample {method} {steps}"] = timed(lambda m=method, n=steps: jaxdiff.sample(
            bundle, key, m, num_steps=n, num_samples=16, labels=labels))
    for name in STEPS:
        config = importlib.import_module(f"experiments.{name}").get_config()
        config.training.batch_size = 64
        fns = train.train_functions(config, devices)
        state = [sharding.shard_state(fns.init_state(key), fns.shardings)]
        frozen = sharding.replicated(train.frozen_weights(config), fns.mesh)
        batch = {k: np.asarray(v)[:, None] for k, v in create_dataset(config).batch(0).items()
                 if k in ("x", "label")}

        def step(fns=fns, state=state, batch=batch, frozen=frozen):
            state[0], metrics = fns.p_train_steps(state[0], batch, key, frozen)  # donated
            return metrics

        out[f"train step {name}"] = timed(step)
    return out


def run_worker(tree: str, calls: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{ROOT}/benchmarks")
    proc = subprocess.run([sys.executable, __file__, "--worker", str(calls)], cwd=tree, env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", help="OLD_TREE NEW_TREE")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    if len(args.trees) != 2:
        parser.error("give two source trees: OLD_TREE NEW_TREE")
    old_tree, new_tree = (os.path.abspath(t) for t in args.trees)
    times = {"old": [], "new": []}
    for r in range(args.rounds):
        for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
            times[side].append(run_worker(old_tree if side == "old" else new_tree, args.calls))
            print(f"round {r + 1} {side}: done", flush=True)
    rows = [{"row": row,
             "old_s": statistics.median(t[row] for t in times["old"]),
             "new_s": statistics.median(t[row] for t in times["new"]),
             "ratio": statistics.median(n[row] / o[row]
                                        for o, n in zip(times["old"], times["new"], strict=True))}
            for row in times["old"][0]]
    print(table(rows, (("row", "", ""), ("old_s", "old (s)", ".4f"), ("new_s", "new (s)", ".4f"),
                       ("ratio", "new / old", ".3f"))))
    print("wrote", write_results("releases", {"old": old_tree, "new": new_tree,
                                              "rounds": args.rounds, "rows": rows}))


if __name__ == "__main__":
    main()
