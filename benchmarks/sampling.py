"""Sampling wall time: `jaxdiff.sample` (one jitted lax.scan over the steps) against a diffusers
Python loop (DDIMScheduler / DDPMScheduler / HeunDiscreteScheduler around UNet2DModel), same
weights, same batch.

    .venv/bin/python benchmarks/sampling.py [--quick] [--batch 16] [--configs tiny mid]

DDIM runs 50 steps (eta 0), DDPM its full chain (--ddpm-steps, default 1000; --quick runs the mid
model's DDPM for 100 respaced steps: per-step cost is the same, so the ratio stands), Heun 18
steps on the Karras grid (EDM arXiv 2206.00364 Alg. 2: 35 network calls, the last step Euler;
diffusers with `use_karras_sigmas=True`). Times are also given per network call (NFE), where
Heun and DDIM should cost the same: the summary prints heun/ddim per NFE. jaxdiff's first call
compiles and is excluded (reported as "first call"); torch is warmed up with a 2-step run.
jaxdiff also runs compiled with XLA's defaults instead of its compiler options
(`jaxdiff.compiler`), to show what those are worth.

The roofline columns bound what any exact float32 implementation could reach here: each network
call is one forward, whose FLOPs (XLA's cost analysis of the forward at the same batch) divided
by the dense f32 matmul rate measured in the same worker give the "floor" time of the whole
loop, and floor / torch time the best jax/torch time ratio that such an implementation could
show against this peer.
"""

from __future__ import annotations

import argparse

from common import (
    cost_flops,
    ensure_weights,
    jax_unet,
    matmul_peak,
    progress,
    rss_mb,
    run_worker,
    setup_torch,
    table,
    time_calls,
    torch_device,
    torch_unet,
    worker_main,
    write_results,
)

T = 1000
STEPS = {"ddim": 50, "heun": 18}  # ddpm: its whole chain (--ddpm-steps)


def nfe(method: str, steps: int) -> int:
    """Network calls: one per step, Heun two but one in its last step (EDM Alg. 2)."""
    return 2 * steps - 1 if method == "heun" else steps


def measure(spec: dict) -> dict:
    return measure_jax(spec) if spec["impl"] == "jax" else measure_torch(spec)


def measure_jax(spec: dict) -> dict:
    import jax

    import jaxdiff
    from jaxdiff import compiler

    if spec["options"] == "xla":
        compiler.OPTIONS.clear()
    model, params, shape = jax_unet(spec["config"])
    schedule = jaxdiff.make_schedule("linear", T)

    options = {"eta": 0.0} if spec["method"] == "ddim" else {}

    def run():
        jaxdiff.sample(params, jax.random.key(0), spec["method"], num_samples=spec["batch"],
                       num_steps=spec["steps"], model=model, schedule=schedule, shape=shape,
                       model_var_type="fixed_small", **options).block_until_ready()

    base = rss_mb()
    timing = time_calls(run, spec["repeats"], 1)
    x = jax.numpy.zeros((spec["batch"], *shape))
    t = jax.numpy.zeros((spec["batch"],), jax.numpy.int32)
    forward = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t),
                      compiler_options=compiler.compiler_options())
    return {**timing, "rss_before_mb": base,
            "flops_per_nfe": cost_flops(forward.lower(params, x, t).compile()),
            "matmul": matmul_peak(repeats=3)}


def measure_torch(spec: dict) -> dict:
    torch = setup_torch()
    from diffusers import DDIMScheduler, DDPMScheduler, HeunDiscreteScheduler

    model, chw = torch_unet(spec["config"])
    if spec["method"] == "ddim":
        scheduler = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear")
    elif spec["method"] == "heun":
        scheduler = HeunDiscreteScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02,
                                          beta_schedule="linear", use_karras_sigmas=True)
    else:
        scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear",
                                  variance_type="fixed_small")

    device = torch_device()
    seeded = spec["method"] != "heun"  # Heun's step draws no noise and takes no generator

    def run(steps):
        gen = torch.Generator(device).manual_seed(0)
        x = torch.randn(spec["batch"], *chw, generator=gen, device=device)
        scheduler.set_timesteps(steps)
        x = x * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps:
                eps = model(scheduler.scale_model_input(x, t), t).sample
                x = scheduler.step(eps, t, x, **({"generator": gen} if seeded else {})).prev_sample
        return x.cpu()  # waits for the last step, on a GPU too

    base = rss_mb()
    run(2)
    return {**time_calls(lambda: run(spec["steps"]), spec["repeats"], 0), "rss_before_mb": base}


COLUMNS = (("config", "config", ""), ("method", "method", ""), ("steps", "steps", "d"),
           ("nfe", "NFE", "d"), ("impl", "impl", ""), ("options", "options", ""),
           ("median_s", "wall s", ".2f"), ("ms_per_nfe", "ms/NFE", ".1f"),
           ("vs_torch", "jax/torch time", ".3f"),
           ("pct_of_f32_peak", "% f32 peak", ".0f"), ("floor_s", "floor s", ".3f"),
           ("best_vs_torch", "best jax/torch", ".3f"),
           ("first_call_s", "first call s", ".1f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
           ("error", "error", ""))


def run(batch: int, repeats: int, configs: list[str], ddpm_steps: dict[str, int],
        timeout: float, methods: tuple[str, ...] = ("ddim", "ddpm", "heun"),
        cpu_variants: bool = True) -> dict:
    ensure_weights(configs)
    results = []
    variants = (("jax", "jaxdiff"), ("jax", "xla"), ("torch", None))
    if not cpu_variants:
        variants = (("jax", "jaxdiff"), ("torch", None))
    for config in configs:
        for method in methods:
            steps = STEPS.get(method, ddpm_steps[config])
            for impl, options in variants:
                spec = {"impl": impl, "config": config, "method": method, "steps": steps,
                        "nfe": nfe(method, steps), "batch": batch, "repeats": repeats,
                        "options": options}
                row = dict(spec)
                row.update(run_worker(__file__, spec, timeout=timeout))
                progress(row)
                results.append(row)
    ok = [r for r in results if "error" not in r]
    for r in ok:
        r["ms_per_nfe"] = 1e3 * r["median_s"] / r["nfe"]
        peer = [p for p in ok if p["impl"] == "torch" and p["config"] == r["config"]
                and p["method"] == r["method"]]
        if r["impl"] == "jax" and peer:
            r["vs_torch"] = r["median_s"] / peer[0]["median_s"]
        rate = r.get("matmul", {}).get("float32_flops_per_s")
        if r.get("flops_per_nfe") and rate:
            r["floor_s"] = r["flops_per_nfe"] * r["nfe"] / rate
            r["pct_of_f32_peak"] = 100 * r["floor_s"] / r["median_s"]
            if peer:
                r["best_vs_torch"] = r["floor_s"] / peer[0]["median_s"]
    print(f"\nSampling, batch {batch}, median of {repeats} (jax/torch time < 1: jaxdiff faster; "
          "floor: the network's FLOPs at the f32 matmul peak)")
    print(table(results, COLUMNS))
    per_nfe = heun_vs_ddim(ok)
    for row in per_nfe:
        print(f"heun/ddim time per NFE, {row['config']} {row['impl']} {row['options'] or ''}: "
              f"{row['ratio']:.3f}")
    payload = {"batch": batch, "repeats": repeats, "results": results,
               "heun_vs_ddim_per_nfe": per_nfe}
    print("wrote", write_results("sampling", payload))
    return payload


def heun_vs_ddim(rows: list[dict]) -> list[dict]:
    """Heun's time per network call over DDIM's, for each config, peer and compiler options."""
    ratios = []
    for heun in (r for r in rows if r["method"] == "heun"):
        ddim = [r for r in rows if r["method"] == "ddim"
                and all(r[k] == heun[k] for k in ("config", "impl", "options"))]
        if ddim:
            ratios.append({k: heun[k] for k in ("config", "impl", "options")}
                          | {"ratio": heun["ms_per_nfe"] / ddim[0]["ms_per_nfe"]})
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="batch 4, 1 repeat, mid-model DDPM 100 steps")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--configs", nargs="+", default=["tiny", "mid"])
    parser.add_argument("--ddpm-steps", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per worker")
    parser.add_argument("--methods", nargs="+", choices=("ddim", "ddpm", "heun"),
                        default=["ddim", "ddpm", "heun"])
    parser.add_argument("--no-cpu-variants", action="store_true",
                        help="skip jaxdiff compiled with XLA's defaults (on an accelerator)")
    args = parser.parse_args()
    ddpm_steps = {c: args.ddpm_steps or (100 if args.quick and c != "tiny" else T)
                  for c in args.configs}
    run(args.batch or (4 if args.quick else 16), args.repeats or (1 if args.quick else 3),
        args.configs, ddpm_steps, args.timeout, tuple(args.methods), not args.no_cpu_variants)


if __name__ == "__main__":
    if not worker_main(measure):
        main()
