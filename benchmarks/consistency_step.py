"""Training cost of the consistency objectives against a plain DDPM step on the same network,
paired in one process: `jaxdiff.train`'s compiled step (loss, grads, Adam, EMA, theta-) for
digits.py (DDPM, eps), digits_edm.py (EDM), digits_cd.py (CD, Heun and Euler teachers),
CT (digits_ict.py's network with CM Alg. 3), digits_ict.py, and the continuous-time and other
few-step objectives (digits_sct.py, digits_scd.py, digits_ect.py, digits_pd.py's first round),
all on the digits U-Net.

    .venv/bin/python benchmarks/consistency_step.py [--family digits] [--batch 64] [--rounds 15]

Counting network passes (a backward pass ~ 2 forward ones): DDPM is 3 (forward + backward),
CT and iCT 4 (the target's forward besides), CD 5 with an Euler teacher and 6 with Heun (its one
or two teacher calls). CD's teacher is a digits.py network of fresh weights, exported to a
temporary workdir: its cost does not depend on its weights. Every step is compiled first
(excluded); each round times one call of each objective, in a rotating order, so the drift of
a shared machine falls on all alike. "x DDPM" is the median over rounds of each round's ratio.
Results go to benchmarks/results/consistency_step.json.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time

from common import ROOT, table, write_results

sys.path.insert(0, ROOT)  # the experiments/ configs, as `python -m jaxdiff.train` finds them

# (row, experiment, overrides): the same network in each family.
FAMILIES = {
    "digits": (
        ("ddpm (eps)", "digits", {}),
        ("edm", "digits_edm", {}),
        ("cd, heun teacher", "digits_cd", {}),
        ("cd, euler teacher", "digits_cd", {"consistency.solver": "euler"}),
        ("ct", "digits_ict", {"consistency.method": "ct", "consistency.distance": "l2",
                              "consistency.start_scales": 2, "consistency.end_scales": 150}),
        ("ict", "digits_ict", {}),
        ("sct", "digits_sct", {}),
        ("scd", "digits_scd", {}),
        ("ect", "digits_ect", {}),
        ("pd", "digits_pd", {}),
    ),
    "cifar": (
        ("ddpm (eps)", "cifar", {}),
        ("edm", "cifar_edm", {}),
        ("cd, heun teacher", "cifar_cd", {"consistency.distance": "l2"}),
        ("ict", "cifar_ict", {}),
    ),
}
TEACHERS = {"digits_cd": "digits", "cifar_cd": "cifar_edm", "digits_scd": "digits_trigflow",
            "digits_ect": "digits_edm", "digits_pd": "digits_edm"}  # their command lines' teachers
PASSES = {"ddpm (eps)": 3, "edm": 3, "cd, heun teacher": 6, "cd, euler teacher": 5, "ct": 4,
          "ict": 4}


def experiment(name: str, overrides: dict, batch: int):
    config = importlib.import_module(f"experiments.{name}").get_config()
    for path, value in overrides.items():
        section, field = path.split(".")
        config[section][field] = value
    config.training.batch_size = batch
    config.training.steps_per_call = 1
    return config


def measure(family: str, batch: int, rounds: int) -> list[dict]:
    import jax
    import numpy as np

    from jaxdiff import checkpoint, sharding, train
    from jaxdiff.data import create_dataset

    devices = jax.devices()[:1]
    key = jax.random.key(0)
    scratch, teachers = tempfile.TemporaryDirectory(), {}
    steps = {}
    for row, name, overrides in FAMILIES[family]:
        config = experiment(name, overrides, batch)
        if name in TEACHERS and name not in teachers:  # fresh weights, the command line's kind
            teacher = experiment(TEACHERS[name], {}, batch)
            teachers[name] = checkpoint.export(
                f"{scratch.name}/{name}", teacher,
                train.train_functions(teacher, devices).init_state(key).params)
        if name in TEACHERS:
            config.distill.teacher = teachers[name]
        fns = train.train_functions(config, devices)
        state = sharding.shard_state(fns.init_state(key), fns.shardings)
        frozen = sharding.replicated(train.frozen_weights(config), fns.mesh)
        b = create_dataset(config).batch(0)
        batch_arrays = {k: np.asarray(v)[:, None] for k, v in b.items() if k in ("x", "label")}
        steps[row] = [fns.p_train_steps, state, batch_arrays, frozen]

    def call(row):
        p_steps, state, batch_arrays, frozen = steps[row]
        start = time.perf_counter()
        state, metrics = p_steps(state, batch_arrays, key, frozen)
        jax.block_until_ready((state, metrics))
        steps[row][1] = state  # the input state was donated
        return time.perf_counter() - start

    compile_s = {row: call(row) for row in steps}
    times = {row: [] for row in steps}
    order = list(steps)
    for i in range(rounds):
        for row in order[i % len(order):] + order[:i % len(order)]:
            times[row].append(call(row))
    scratch.cleanup()
    base = times["ddpm (eps)"]
    return [{"objective": row, "passes": PASSES.get(row),
             "ms_per_step": 1e3 * statistics.median(t),
             "vs_ddpm": statistics.median(a / b for a, b in zip(t, base, strict=True)),
             "first_call_s": compile_s[row]} for row, t in times.items()]


COLUMNS = (("objective", "objective", ""), ("passes", "network passes", "d"),
           ("ms_per_step", "ms / step", ".1f"), ("vs_ddpm", "x DDPM", ".2f"),
           ("first_call_s", "compile + first (s)", ".1f"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=tuple(FAMILIES), default="digits")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    rows = measure(args.family, args.batch, args.rounds)
    print(f"{args.family} network, batch {args.batch}, median of {args.rounds} rounds")
    print(table(rows, COLUMNS))
    print("wrote", write_results("consistency_step", {"family": args.family,
                                                      "batch": args.batch, "rows": rows}))


if __name__ == "__main__":
    main()
