"""U-Net forward images/s: jaxdiff (jit, float32 / bfloat16 compute) against diffusers'
UNet2DModel (torch eager float32 / bf16 autocast, torch.compile float32), same weights.

    .venv/bin/python benchmarks/unet_forward.py [--quick] [--batch 64] [--configs ddpm_cifar10 mid]

Also reports FLOPs per image (XLA's cost analysis), the achieved FLOP/s and its fraction of the
machine's dense f32 matmul rate (measured in the same run), peak RSS per worker, and jaxdiff
float32 once more compiled with XLA's defaults instead of jaxdiff's compiler options
(`jaxdiff.compiler`), to show what those are worth.
"""

from __future__ import annotations

import argparse
import time

from common import (
    cost_flops,
    ensure_weights,
    jax_unet,
    matmul_peak,
    num_params,
    progress,
    report,
    rss_mb,
    run_worker,
    setup_torch,
    summarise,
    time_calls,
    torch_unet,
    worker_main,
)

# (impl, dtype, compiler options); impl "jax", "torch" (eager) or "torch.compile"; jax compiles
# with jaxdiff's compiler options ("jaxdiff", what `jaxdiff.sample` uses) or XLA's ("xla").
VARIANTS = (("jax", "float32", "jaxdiff"), ("jax", "bfloat16", "jaxdiff"),
            ("jax", "float32", "xla"), ("torch", "float32", None), ("torch", "bfloat16", None),
            ("torch.compile", "float32", None))


def measure(spec: dict) -> dict:
    if spec.get("peak"):
        return matmul_peak()
    if spec["impl"] == "jax":
        return measure_jax(spec)
    return measure_torch(spec)


def measure_jax(spec: dict) -> dict:
    import jax

    from jaxdiff.compiler import compiler_options

    model, params, shape = jax_unet(spec["config"], spec["dtype"])
    batch = spec["batch"]
    x = jax.random.normal(jax.random.key(0), (batch, *shape))
    t = jax.random.randint(jax.random.key(1), (batch,), 0, 1000)
    options = compiler_options() if spec["options"] == "jaxdiff" else None
    forward = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t), compiler_options=options)
    start = time.perf_counter()
    compiled = forward.lower(params, x, t).compile()
    compile_s = time.perf_counter() - start
    flops = cost_flops(compiled)
    base = rss_mb()
    timing = time_calls(lambda: compiled(params, x, t).block_until_ready(), spec["repeats"], 2)
    return {**timing, "compile_s": compile_s, "flops_per_call": flops, "rss_before_mb": base,
            "matmul": matmul_peak(repeats=3)}


def measure_torch(spec: dict) -> dict:
    torch = setup_torch()
    model, chw = torch_unet(spec["config"])
    batch = spec["batch"]
    x = torch.randn(batch, *chw, generator=torch.Generator().manual_seed(0))
    t = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(1))
    compile_s = None
    if spec["impl"] == "torch.compile":
        model = torch.compile(model)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["dtype"] == "bfloat16")

    def forward():
        with torch.no_grad(), autocast:
            return model(x, t).sample

    base = rss_mb()
    if spec["impl"] == "torch.compile":
        start = time.perf_counter()
        forward()
        compile_s = time.perf_counter() - start
    timing = time_calls(forward, spec["repeats"], 2)
    return {**timing, "compile_s": compile_s, "rss_before_mb": base}


COLUMNS = (("config", "config", ""), ("impl", "impl", ""), ("dtype", "dtype", ""),
           ("options", "options", ""), ("images_per_s", "img/s", ".1f"),
           ("vs_torch_eager", "jax/eager", ".2f"), ("vs_torch_compile", "jax/compile", ".2f"),
           ("gflop_per_image", "GFLOP/img", ".2f"), ("gflop_per_s", "GFLOP/s", ".1f"),
           ("pct_of_f32_peak", "% f32 peak", ".1f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
           ("compile_s", "compile s", ".1f"), ("error", "error", ""))


def run(batch: int, repeats: int, configs: list[str], compile_torch: bool = True) -> dict:
    ensure_weights(configs)
    here = __file__
    peak = run_worker(here, {"peak": True})
    results = []
    for config in configs:
        for impl, dtype, options in VARIANTS:
            if impl == "torch.compile" and not compile_torch:
                continue
            spec = {"impl": impl, "dtype": dtype, "config": config, "batch": batch,
                    "repeats": repeats, "options": options}
            row = {**spec, "params": num_params(config)}
            row.update(run_worker(here, spec))
            progress(row)
            results.append(row)
    summarise(results, peak)
    return report("unet_forward", "U-Net forward", batch, repeats, peak, results, COLUMNS,
                  bf16=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 8, 2 repeats")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--configs", nargs="+", default=["ddpm_cifar10", "mid"])
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args()
    batch = args.batch or (8 if args.quick else 64)
    repeats = args.repeats or (2 if args.quick else 5)
    run(batch, repeats, args.configs, not args.no_compile)


if __name__ == "__main__":
    if not worker_main(measure):
        main()
