"""Every benchmark in one run (`make bench`): U-Net forward, train step, sampling, sampler
compile time; then one summary of the jaxdiff/peer ratios.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only forward train sampling compile]

Each benchmark prints its own table and writes benchmarks/results/<name>.json; the summary goes to
benchmarks/results/summary.json with the load average before and after (the figures are only as
quiet as the machine was).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import sampling
import train_step
import unet_forward
from common import machine, write_results

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ("forward", "train", "sampling", "compile")


def ratios(name: str, payload: dict) -> list[str]:
    """One line per jaxdiff row: its ratio against each peer."""
    lines = []
    for r in payload["results"]:
        if r.get("impl") != "jax" or "error" in r:
            continue
        where = " ".join(str(r[k]) for k in ("config", "method", "dtype", "options") if r.get(k))
        cells = [f"{label} {r[key]:.2f}" for key, label in
                 (("vs_torch_eager", "img/s vs eager"), ("vs_torch_compile", "img/s vs compile"),
                  ("vs_torch", "time vs torch"))
                 if r.get(key) is not None]
        lines.append(f"{name:9s} {where}: " + ", ".join(cells or ["no peer"]))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches, few repeats")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    args = parser.parse_args()
    q = args.quick
    before = machine()
    print(f"load average {before['load_average']}, {before['cpu_count']} CPUs", flush=True)
    start = time.time()
    summary, lines = {}, []
    if "forward" in args.only:
        print("== U-Net forward", flush=True)
        summary["forward"] = unet_forward.run(8 if q else 64, 2 if q else 5,
                                              ["ddpm_cifar10", "mid"])
        lines += ratios("forward", summary["forward"])
    if "train" in args.only:
        print("== Train step", flush=True)
        summary["train"] = train_step.run(8 if q else 32, 2 if q else 5, ["ddpm_cifar10", "mid"])
        lines += ratios("train", summary["train"])
    if "sampling" in args.only:
        print("== Sampling", flush=True)
        steps = {"tiny": 1000, "mid": 100 if q else 1000}
        summary["sampling"] = sampling.run(4 if q else 16, 1 if q else 3, ["tiny", "mid"], steps,
                                           timeout=1200)
        lines += ratios("sampling", summary["sampling"])
    if "compile" in args.only:
        print("== Sampler compile time (benchmarks/compile_time.py)", flush=True)
        repeats = "1" if q else "3"
        proc = subprocess.run([sys.executable, os.path.join(HERE, "compile_time.py"),
                               "--repeats", repeats], capture_output=True, text=True)
        print(proc.stdout + proc.stderr[-2000:] if proc.returncode not in (0, 1) else proc.stdout)
        summary["compile_time"] = {"returncode": proc.returncode, "stdout": proc.stdout}
        lines.append(f"compile   1000-step/10-step compile ratio: "
                     f"{'ok' if proc.returncode == 0 else 'FAIL (see table)'}")
    after = machine()
    print(f"\n== Summary ({time.time() - start:.0f}s; load average before "
          f"{before['load_average']}, after {after['load_average']})")
    print("\n".join(lines))
    summary["load_average_before"] = before["load_average"]
    print("wrote", write_results("summary", {"quick": q, "ratios": lines, **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
