"""DiT-S/2 and DiT-B/2 (arXiv 2212.09748) forward and training step images/s: jaxdiff's `DiT`
against diffusers' `DiTTransformer2DModel` on the same weights, in one run.

    .venv/bin/python benchmarks/dit.py [--quick] [--batch 16] [--configs dit_s2 dit_b2]

Forward: jit against torch eager (no_grad), float32. Training step: jaxdiff's
`train_functions(config).p_train_steps` (what `python -m jaxdiff.train` runs; eps loss, labels,
AdamW 1e-4 without weight decay or clipping, EMA 0.9999, as DiT trains) against the same step
written for the diffusers model in torch eager float32. 256 tokens per image (2x2 patches of
32x32), 10 classes. The jax/eager column is the ratio of images/s.
"""

from __future__ import annotations

import argparse
import time

from common import (
    CONFIGS,
    cost_flops,
    ensure_weights,
    jax_dit,
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

LR, EMA_DECAY, T = 1e-4, 0.9999, 1000
VARIANTS = (("jax", "forward"), ("torch", "forward"), ("jax", "train"), ("torch", "train"))


def measure(spec: dict) -> dict:
    if spec.get("peak"):
        return matmul_peak()
    return measure_jax(spec) if spec["impl"] == "jax" else measure_torch(spec)


def measure_jax(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxdiff.compiler import compiler_options
    from jaxdiff.convert import dataset_of_channels
    from jaxdiff.convert_dit import dit_config_from_diffusers
    from jaxdiff.sharding import shard_state
    from jaxdiff.train import train_functions

    model, params, shape = jax_dit(spec["config"])
    batch = spec["batch"]
    x = jax.random.normal(jax.random.key(0), (batch, *shape))
    t = jax.random.randint(jax.random.key(1), (batch,), 0, T)
    y = jnp.arange(batch) % 10
    if spec["mode"] == "forward":
        fn = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y),
                     compiler_options=compiler_options())
        args = (params, x, t, y)
        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - start

        def call():
            compiled(*args).block_until_ready()
    else:
        config = dit_config_from_diffusers(CONFIGS[spec["config"]], dataset_of_channels)
        config.training.batch_size = batch
        config.training.ema_decay = EMA_DECAY
        config.optim.optimizer, config.optim.weight_decay = "adamw", 0.0
        config.optim.lr, config.optim.grad_clip, config.optim.warmup_steps = LR, 0.0, 0
        devices = [jax.devices()[0]]
        fns = train_functions(config, devices=devices)
        state = fns.init_state(jax.random.key(0))
        holder = [shard_state(state.replace(params=params, ema_params=params), fns.shardings)]
        batches = {"x": x[None, None], "label": y[None, None].astype(jnp.int32)}
        rng = jax.random.key(2)
        start = time.perf_counter()
        compiled = fns.p_train_steps.lower(holder[0], batches, rng, None).compile()
        compile_s = time.perf_counter() - start

        def call():
            holder[0], metrics = fns.p_train_steps(holder[0], batches, rng, None)
            jax.block_until_ready((holder[0], metrics))
    flops = cost_flops(compiled)
    base = rss_mb()
    timing = time_calls(call, spec["repeats"], 2)
    return {**timing, "compile_s": compile_s, "flops_per_call": flops, "rss_before_mb": base,
            "matmul": matmul_peak(repeats=3)}


def measure_torch(spec: dict) -> dict:
    torch = setup_torch()
    from diffusers import DDPMScheduler

    model, chw = torch_unet(spec["config"])
    device = torch_device()
    gen = torch.Generator(device).manual_seed(0)
    batch = spec["batch"]
    x0 = torch.randn(batch, *chw, generator=gen, device=device)
    y = torch.arange(batch, device=device) % 10
    if spec["mode"] == "forward":
        t = torch.randint(0, T, (batch,), generator=gen, device=device)

        def call():
            with torch.no_grad():
                return model(x0, t, y).sample.sum().item()
    else:
        model.train()
        params = list(model.parameters())
        ema = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, foreach=True)
        alphas = DDPMScheduler(num_train_timesteps=T).alphas_cumprod.to(device)

        def call():
            t = torch.randint(0, T, (batch,), generator=gen, device=device)
            noise = torch.randn(x0.shape, generator=gen, device=device)
            a = alphas[t].view(-1, 1, 1, 1)
            loss = torch.nn.functional.mse_loss(
                model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, y).sample, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - EMA_DECAY)
            return loss.item()  # waits for the step, on a GPU too
    base = rss_mb()
    timing = time_calls(call, spec["repeats"], 2)
    return {**timing, "rss_before_mb": base}


COLUMNS = (("config", "config", ""), ("mode", "mode", ""), ("impl", "impl", ""),
           ("images_per_s", "img/s", ".2f"), ("vs_torch_eager", "jax/eager", ".2f"),
           ("gflop_per_image", "GFLOP/img", ".2f"), ("pct_of_f32_peak", "% f32 peak", ".1f"),
           ("peak_rss_mb", "peak RSS MB", ".0f"), ("compile_s", "compile s", ".1f"),
           ("error", "error", ""))


def run(batch: int, repeats: int, configs: list[str]) -> dict:
    ensure_weights(configs)
    peak = run_worker(__file__, {"peak": True})
    results = []
    for config in configs:
        for mode in ("forward", "train"):
            rows = []
            for impl, variant_mode in VARIANTS:
                if variant_mode != mode:
                    continue
                spec = {"impl": impl, "mode": mode, "config": config, "batch": batch,
                        "repeats": repeats}
                row = {**spec, "dtype": "float32", "params": num_params(config)}
                row.update(run_worker(__file__, spec))
                progress(row)
                rows.append(row)
            # `summarise` pairs rows by config: a forward row with a forward row.
            results += summarise([{**r, "config": f"{config} {mode}"} for r in rows], peak)
    for r in results:
        r["config"] = r["config"].split()[0]
    return report("dit", "DiT", batch, repeats, peak, results, COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 4, 2 repeats")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--configs", nargs="+", default=["dit_s2", "dit_b2"])
    args = parser.parse_args()
    run(args.batch or (4 if args.quick else 16), args.repeats or (2 if args.quick else 5),
        args.configs)


if __name__ == "__main__":
    if not worker_main(measure):
        main()
