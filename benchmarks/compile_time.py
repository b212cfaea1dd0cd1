"""Compile time of `jaxdiff.sample` against the number of steps: a scan, so it must stay flat.

    .venv/bin/python benchmarks/compile_time.py [--methods ddim ddpm dpm_solver++] [--repeats 3]

For each method and step count (10, 100, 1000; T = 1000) a fresh tiny MLP denoiser forces one
new compilation of the sampler. Compile cost = CPU time of that first call minus the CPU time of
a second, cached call (best of --repeats); the wall time JAX reports for tracing, lowering and
XLA compilation is printed beside it. Exits 1 when compile(1000) / compile(10) > 1.2.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
STEPS = (10, 100, 1000)
MAX_RATIO = 1.2


def make_mlp(rng: jax.Array, dim: int = 2, hidden: int = 64, emb: int = 16):
    """A fresh (params, callable) pair: a new function object, so the sampler compiles anew."""
    k1, k2, k3 = jax.random.split(rng, 3)
    params = {"w1": jax.random.normal(k1, (dim + emb, hidden)) / 4,
              "w2": jax.random.normal(k2, (hidden, hidden)) / 8,
              "w3": jax.random.normal(k3, (hidden, dim)) / 8}

    def mlp(params, x, t, y):
        freqs = jnp.exp(-jnp.log(1e4) * jnp.arange(emb // 2) / (emb // 2))
        angles = t[:, None].astype(jnp.float32) * freqs
        h = jnp.concatenate([x, jnp.sin(angles), jnp.cos(angles)], axis=-1)
        h = jax.nn.silu(h @ params["w1"])
        h = jax.nn.silu(h @ params["w2"])
        return h @ params["w3"]

    return params, mlp


class CompileClock:
    """Sums the (wall-clock) durations JAX reports for tracing, lowering and compiling."""

    def __init__(self):
        self.total = 0.0

    def __call__(self, event: str, duration: float, **kwargs) -> None:
        if event in COMPILE_EVENTS:
            self.total += duration


def compile_seconds(method: str, num_steps: int, seed: int, schedule) -> tuple[float, float]:
    """(wall seconds JAX reports compiling, CPU seconds of the first call minus a cached call).

    CPU time is the figure the ratio uses: on a shared machine it hardly moves with the load.
    """
    params, mlp = make_mlp(jax.random.key(seed))

    def call(key):
        start = time.process_time()
        jaxdiff.sample(params, jax.random.key(key), method, num_samples=64, num_steps=num_steps,
                       model=mlp, schedule=schedule, shape=(2,)).block_until_ready()
        return time.process_time() - start

    clock = CompileClock()
    jax.monitoring.register_event_duration_secs_listener(clock)
    try:
        first = call(0)
    finally:
        jax.monitoring.unregister_event_duration_listener(clock)
    return clock.total, first - call(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["ddim", "ddpm", "dpm_solver++"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    schedule = jaxdiff.make_schedule("linear", 1000)
    compile_seconds("ddim", 5, seed=-1, schedule=schedule)  # warm the eager helpers
    print(f"backend {jax.default_backend()}, {jax.local_device_count()} device(s); "
          f"best of {args.repeats}: CPU seconds (wall seconds JAX reports)")
    print(f"{'method':14s}" + "".join(f"{s:>19d} st" for s in STEPS) + "   1000/10 (CPU)")
    failed = False
    seed = 0
    for method in args.methods:
        walls, cpus = [], []
        for num_steps in STEPS:
            runs = []
            for _ in range(args.repeats):
                seed += 1
                runs.append(compile_seconds(method, num_steps, seed, schedule))
            walls.append(min(wall for wall, _ in runs))
            cpus.append(min(cpu for _, cpu in runs))
        ratio = cpus[-1] / cpus[0]
        failed |= ratio > MAX_RATIO
        cells = "".join(f"{c:10.3f}s ({w:6.3f}s)" for c, w in zip(cpus, walls, strict=True))
        print(f"{method:14s}{cells}   {ratio:7.3f}")
    print(f"ratio limit {MAX_RATIO}: {'FAIL' if failed else 'ok'}")
    return int(failed)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
