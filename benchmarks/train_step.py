"""Training step images/s (eps loss, gradients, grad-norm clipping, Adam, EMA): jaxdiff's
`jaxdiff.train` step against the same step written for diffusers' UNet2DModel in torch.

    .venv/bin/python benchmarks/train_step.py [--quick] [--batch 32] [--configs ddpm_cifar10 mid]

jaxdiff runs `train_functions(config).p_train_steps` (the shard_map step `python -m jaxdiff.train`
runs, here on one CPU device, one step per call) with DDPM's settings (Adam 2e-4, clip 1.0,
EMA 0.9999, dropout 0 on both sides); torch runs eager float32 or bf16 autocast, and
`torch.compile` float32, with `torch.optim.Adam(foreach=True)`, `clip_grad_norm_` and a foreach
EMA. Same weights on both sides. FLOPs per image come from XLA's cost analysis of the compiled
jaxdiff step. jaxdiff float32 runs once more compiled with XLA's defaults instead of its
compiler options (`jaxdiff.compiler`), to show what those are worth.
"""

from __future__ import annotations

import argparse
import time

from common import (
    CONFIGS,
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
    torch_device,
    torch_unet,
    worker_main,
)

# (impl, dtype, options); impl "jax", "torch" (eager) or "torch.compile". jax compiles with
# jaxdiff's compiler options ("jaxdiff", what `python -m jaxdiff.train` uses) or XLA's ("xla").
VARIANTS = (("jax", "float32", "jaxdiff"), ("jax", "bfloat16", "jaxdiff"),
            ("jax", "float32", "xla"),
            ("torch", "float32", None), ("torch", "bfloat16", None),
            ("torch.compile", "float32", None))
LR, CLIP, EMA_DECAY, T = 2e-4, 1.0, 0.9999, 1000


def measure(spec: dict) -> dict:
    if spec.get("peak"):
        return matmul_peak()
    return measure_jax(spec) if spec["impl"] == "jax" else measure_torch(spec)


def measure_jax(spec: dict) -> dict:
    import jax

    from jaxdiff import compiler
    from jaxdiff.convert import config_from_diffusers
    from jaxdiff.sharding import shard_state
    from jaxdiff.train import train_functions

    if spec["options"] == "xla":
        compiler.OPTIONS.clear()
    config = config_from_diffusers(CONFIGS[spec["config"]])
    config.model.dropout = 0.0
    config.model.dtype = spec["dtype"]
    config.training.batch_size = spec["batch"]
    config.training.ema_decay = EMA_DECAY
    config.optim.lr, config.optim.grad_clip = LR, CLIP
    devices = [jax.devices()[0]]
    fns = train_functions(config, devices=devices)
    _, params, shape = jax_unet(spec["config"])
    state = fns.init_state(jax.random.key(0))
    state = shard_state(state.replace(params=params, ema_params=params), fns.shardings)
    batches = {"x": jax.random.normal(jax.random.key(1), (1, 1, spec["batch"], *shape))}
    rng = jax.random.key(2)
    start = time.perf_counter()
    compiled = fns.p_train_steps.lower(state, batches, rng, None).compile()  # no teacher
    compile_s = time.perf_counter() - start
    flops = cost_flops(compiled)
    holder = [state]

    def step():
        holder[0], metrics = fns.p_train_steps(holder[0], batches, rng, None)
        jax.block_until_ready((holder[0], metrics))

    base = rss_mb()
    timing = time_calls(step, spec["repeats"], 2)
    return {**timing, "compile_s": compile_s, "flops_per_call": flops, "rss_before_mb": base,
            "matmul": matmul_peak(repeats=3)}


def measure_torch(spec: dict) -> dict:
    torch = setup_torch()
    from diffusers import DDPMScheduler

    model, chw = torch_unet(spec["config"])
    model.train()
    params = list(model.parameters())
    if spec["impl"] == "torch.compile":
        model = torch.compile(model)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=LR, foreach=True)
    device = torch_device()
    alphas = DDPMScheduler(num_train_timesteps=T).alphas_cumprod.to(device)
    gen = torch.Generator(device).manual_seed(0)
    x0 = torch.randn(spec["batch"], *chw, generator=gen, device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=spec["dtype"] == "bfloat16")

    def step():
        t = torch.randint(0, T, (len(x0),), generator=gen, device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with autocast:
            out = model(xt, t).sample
        loss = torch.nn.functional.mse_loss(out.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - EMA_DECAY)
        return loss.item()  # waits for the step, on a GPU too

    base = rss_mb()
    timing = time_calls(step, spec["repeats"], 2)
    return {**timing, "rss_before_mb": base}


COLUMNS = (("config", "config", ""), ("impl", "impl", ""), ("dtype", "dtype", ""),
           ("options", "options", ""), ("images_per_s", "img/s", ".2f"),
           ("vs_torch_eager", "jax/eager", ".2f"), ("vs_torch_compile", "jax/compile", ".2f"),
           ("gflop_per_image", "GFLOP/img", ".2f"), ("gflop_per_s", "GFLOP/s", ".1f"),
           ("pct_of_f32_peak", "% f32 peak", ".1f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
           ("compile_s", "compile s", ".1f"), ("error", "error", ""))


def run(batch: int, repeats: int, configs: list[str], cpu_variants: bool = True) -> dict:
    ensure_weights(configs)
    peak = run_worker(__file__, {"peak": True})
    results = []
    for config in configs:
        for impl, dtype, options in VARIANTS:
            if options == "xla" and not cpu_variants:
                continue
            spec = {"impl": impl, "dtype": dtype, "config": config, "batch": batch,
                    "repeats": repeats, "options": options}
            row = {**spec, "params": num_params(config)}
            row.update(run_worker(__file__, spec))
            progress(row)
            results.append(row)
    summarise(results, peak)
    return report("train_step", "Train step", batch, repeats, peak, results, COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 8, 2 repeats")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--configs", nargs="+", default=["ddpm_cifar10", "mid"])
    parser.add_argument("--no-cpu-variants", action="store_true",
                        help="skip the XLA:CPU option rows (on an accelerator)")
    args = parser.parse_args()
    run(args.batch or (8 if args.quick else 32), args.repeats or (2 if args.quick else 5),
        args.configs, not args.no_cpu_variants)


if __name__ == "__main__":
    if not worker_main(measure):
        main()
