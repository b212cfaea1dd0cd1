"""Heun's cost per network call against DDIM's, paired in one process: `heun` at 18 steps and
`ddim` at 35 make the same 35 network calls (EDM Alg. 2's last step is Euler), so their time
ratio is the per-NFE ratio, and alternating the two calls cancels the drift of a shared machine.

    .venv/bin/python benchmarks/heun_per_nfe.py [--configs tiny] [--batch 4] [--pairs 15]

Both are compiled first (excluded); each pair times one call of each, in alternating order. The
ratio heun/ddim is reported as the median of the pairs' ratios and as the ratio of the fastest
calls; `sampling.py` gives the same ratio from separate workers, which a busy machine blurs.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import ensure_weights, jax_unet, write_results

T = 1000
CALLS = {"heun": 18, "ddim": 35}  # both 35 network calls


def measure(config: str, batch: int, pairs: int) -> dict:
    import jax

    import jaxdiff

    model, params, shape = jax_unet(config)
    schedule = jaxdiff.make_schedule("linear", T)

    def call(method):
        start = time.perf_counter()
        jaxdiff.sample(params, jax.random.key(0), method, num_samples=batch,
                       num_steps=CALLS[method], model=model, schedule=schedule,
                       shape=shape).block_until_ready()
        return time.perf_counter() - start

    first = {method: call(method) for method in CALLS}
    times = {method: [] for method in CALLS}
    for i in range(pairs):
        for method in (("heun", "ddim") if i % 2 else ("ddim", "heun")):
            times[method].append(call(method))
    ratios = [h / d for h, d in zip(times["heun"], times["ddim"], strict=True)]
    return {"config": config, "batch": batch, "pairs": pairs, "first_call_s": first,
            "times_s": times, "median_ratio": statistics.median(ratios),
            "min_ratio": min(times["heun"]) / min(times["ddim"]),
            "ms_per_nfe": {m: 1e3 * statistics.median(t) / 35 for m, t in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=15)
    args = parser.parse_args()
    ensure_weights(args.configs)
    results = []
    for config in args.configs:
        r = measure(config, args.batch, args.pairs)
        results.append(r)
        print(f"{config} batch {args.batch}: ms/NFE heun {r['ms_per_nfe']['heun']:.1f}, ddim "
              f"{r['ms_per_nfe']['ddim']:.1f}; heun/ddim per NFE: median of {args.pairs} pairs "
              f"{r['median_ratio']:.3f}, fastest calls {r['min_ratio']:.3f}", flush=True)
    print("wrote", write_results("heun_per_nfe", {"results": results}))


if __name__ == "__main__":
    main()
