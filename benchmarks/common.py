"""What every benchmark shares: the networks, the worker processes, timing, tables, results.

Each measurement runs in its own worker process (`python benchmarks/<script>.py --worker SPEC`)
so that its peak RSS is its own, XLA_FLAGS can differ between runs, and a crash or a hang of one
peer does not take the others down. Both frameworks run the same weights: a seeded diffusers
`UNet2DModel` is saved once under benchmarks/results/weights/ and jaxdiff reads it through
`jaxdiff.convert`. Threads are set alike: torch gets `THREADS` intra-op threads, XLA:CPU runs on
the host's cores (THREADS on the 2-core machine these figures come from). BENCH_THREADS=1 runs
both single-threaded (torch.set_num_threads(1); XLA_FLAGS single-threaded Eigen), which is steadier
on a machine shared with other work: OpenMP's spinning threads suffer most when cores are busy.

Not part of the test suite; `make bench` runs them all through `benchmarks/run_all.py`.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
SINGLE_THREADED_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

# diffusers UNet2DModel configs (and so, through jaxdiff.convert, our UNet's). The DDPM one
# repeats jaxdiff.convert.DDPM_CIFAR10_CONFIG so that the torch workers never import jax
# (it would count in their peak memory).
_DDPM = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, norm_eps=1e-6, norm_num_groups=32, flip_sin_to_cos=False,
    freq_shift=1, downsample_padding=0, act_fn="silu", center_input_sample=False,
    time_embedding_type="positional", mid_block_scale_factor=1, dropout=0.0,
)
CONFIGS: dict[str, dict[str, Any]] = {
    # DDPM's CIFAR-10 network (arXiv 2006.11239 App. B), 35.7M parameters.
    "ddpm_cifar10": _DDPM,
    # The same shape at half the width: 8.9M parameters.
    "mid": {**_DDPM, "block_out_channels": (64, 128, 128, 128)},
    # Two levels, one block each, attention at 8x8, 16x16 images.
    "tiny": {**_DDPM, "sample_size": 16, "block_out_channels": (32, 64), "layers_per_block": 1,
             "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
             "up_block_types": ("AttnUpBlock2D", "UpBlock2D")},
}
# diffusers DiTTransformer2DModel configs: DiT-S/2 and DiT-B/2 (arXiv 2212.09748 Table 1) over
# 2x2 patches of a 32x32x3 image (256 tokens, as ImageNet 256's latents), 10 classes, eps only.
_DIT = dict(_class_name="DiTTransformer2DModel", in_channels=3, out_channels=3, sample_size=32,
            patch_size=2, num_embeds_ada_norm=10)
CONFIGS |= {
    "dit_s2": {**_DIT, "num_layers": 12, "num_attention_heads": 6, "attention_head_dim": 64},
    "dit_b2": {**_DIT, "num_layers": 12, "num_attention_heads": 12, "attention_head_dim": 64},
}


# ---------------------------------------------------------------------------------------------
# Worker processes.


def run_worker(script: str, spec: dict[str, Any], *, xla_flags: str = "",
               timeout: float = 900) -> dict[str, Any]:
    """Runs `script --worker SPEC` in a fresh process; its last stdout line is its JSON result.

    A failure (non-zero exit, timeout, no JSON) is returned as {"error": "..."} with the tail of
    stderr, so one broken peer is reported instead of stopping the run.
    """
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    if THREADS == 1:
        xla_flags = f"{xla_flags} {SINGLE_THREADED_XLA}".strip()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags, PYTHONPATH=path,
               TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [sys.executable, script, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return {"error": f"exit {proc.returncode}: {tail[-600:]}"}
    return json.loads(lines[-1])


def worker_main(measure: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """If this process was started by `run_worker`, runs `measure(spec)`, prints its JSON
    (with the process's peak RSS) and returns True."""
    if len(sys.argv) < 3 or sys.argv[1] != "--worker":
        return False
    spec = json.loads(sys.argv[2])
    result = measure(spec)
    result.update(peak_rss_mb=peak_rss_mb(), xla_flags=os.environ.get("XLA_FLAGS", ""))
    print(json.dumps(result))
    return True


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """This process's current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---------------------------------------------------------------------------------------------
# Timing.


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Wall seconds of `fn()` (which must block until its work is done): warm-up calls first,
    then `repeats` timed calls; the first warm-up call's time is kept (it includes compiling)."""
    first = None
    for i in range(warmup):
        start = time.perf_counter()
        fn()
        if i == 0:
            first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "times_s": times, "first_call_s": first}


def cost_flops(compiled: Any) -> float | None:
    """FLOPs of one call of a compiled jax function, from XLA's cost analysis."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, Sequence):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return None if flops is None else float(flops)


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """The machine's dense f32 (and bf16) matmul rate in FLOP/s, measured with jnp.dot [n, n]."""
    import jax
    import jax.numpy as jnp

    out = {}
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        dot = jax.jit(jnp.dot)
        timing = time_calls(lambda a=a, b=b, dot=dot: dot(a, b).block_until_ready(), repeats, 2)
        out[f"{name}_flops_per_s"] = 2 * n**3 / min(timing["times_s"])
    return out


def best_f32_peak(peak: dict[str, Any], results: list[dict[str, Any]]) -> float | None:
    """The highest dense f32 matmul rate seen in the run: the peak worker's, or one that a jax
    worker measured right after its own timing (the load changes while a run goes on)."""
    rates = [peak.get("float32_flops_per_s")]
    rates += [r.get("matmul", {}).get("float32_flops_per_s") for r in results]
    rates = [r for r in rates if r]
    return max(rates) if rates else None


def summarise(results: list[dict[str, Any]], peak: dict[str, Any]) -> list[dict[str, Any]]:
    """Adds to each result row (forward or training) its images/s, FLOPs per image (from the
    float32 jax row of its config), utilisation of the f32 matmul peak and, for jax rows, the
    images/s ratios against torch eager of the same dtype and `torch.compile` float32."""
    ok = [r for r in results if "error" not in r]
    flops_per_image = {r["config"]: r["flops_per_call"] / r["batch"] for r in ok
                       if r.get("flops_per_call") and r["dtype"] == "float32"}
    f32_peak = peak["float32_flops_per_s"] = best_f32_peak(peak, results)
    for r in ok:
        r["images_per_s"] = r["batch"] / r["median_s"]
        fpi = flops_per_image.get(r["config"])
        if fpi:
            r["gflop_per_image"] = fpi / 1e9
            r["gflop_per_s"] = fpi * r["images_per_s"] / 1e9
            if f32_peak:
                r["pct_of_f32_peak"] = 100 * fpi * r["images_per_s"] / f32_peak
    for r in ok:
        if r["impl"] != "jax":
            continue
        for peer, key in (("torch", "vs_torch_eager"), ("torch.compile", "vs_torch_compile")):
            match = [p for p in ok if p["impl"] == peer and p["config"] == r["config"]
                     and (p["dtype"] == r["dtype"] or peer != "torch")]
            if match:
                r[key] = r["images_per_s"] / match[0]["images_per_s"]
    return results


# ---------------------------------------------------------------------------------------------
# The networks.


def weights_path(name: str) -> str:
    return os.path.join(RESULTS, "weights", f"{name}.safetensors")


def make_weights(name: str) -> str:
    """Saves a seeded diffusers model of config `name` once (torch imported here only); a DiT's
    per-block embedder copies are made equal, as in the published weights."""
    path = weights_path(name)
    if not os.path.exists(path):
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        model = torch_unet_from_config(name)
        for block in getattr(model, "transformer_blocks", [])[1:]:  # a DiT: block 0's embedders
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


def torch_unet_from_config(name: str):
    """The diffusers model of config `name`: a UNet2DModel, or the class its `_class_name` names."""
    import diffusers

    config = dict(CONFIGS[name])
    return getattr(diffusers, config.pop("_class_name", "UNet2DModel"))(**config)


def torch_device() -> str:
    """Where torch runs: "cuda" when it sees a GPU (benchmarks/gpu.sh), else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_unet(name: str):
    """(diffusers UNet2DModel in eval mode with the saved weights on `torch_device()`, image
    shape CHW)."""
    from safetensors.torch import load_file

    model = torch_unet_from_config(name)
    model.load_state_dict(load_file(weights_path(name)))
    cfg = CONFIGS[name]
    return (model.eval().to(torch_device()),
            (cfg["in_channels"], cfg["sample_size"], cfg["sample_size"]))


def jax_unet(name: str, dtype: str = "float32"):
    """(our UNet at compute dtype `dtype`, its params converted from the saved weights, HWC)."""
    import jax.numpy as jnp

    from jaxdiff.convert import (
        convert_diffusers_unet,
        load_diffusers_state_dict,
        unet_kwargs_from_diffusers,
    )
    from jaxdiff.models.unet import UNet

    cfg = CONFIGS[name]
    params = convert_diffusers_unet(load_diffusers_state_dict(weights_path(name)), cfg)
    kwargs = unet_kwargs_from_diffusers(cfg)
    size, channels = kwargs.pop("image_size"), kwargs.pop("channels")
    model = UNet(**kwargs, dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype])
    return model, params, (size, size, channels)


def jax_dit(name: str, dtype: str = "float32"):
    """(our DiT at compute dtype `dtype`, its params converted from the saved weights, HWC)."""
    import jax.numpy as jnp

    from jaxdiff.convert import load_diffusers_state_dict
    from jaxdiff.convert_dit import convert_diffusers_dit, dit_kwargs_from_diffusers
    from jaxdiff.models.dit import DiT

    cfg = CONFIGS[name]
    params = convert_diffusers_dit(load_diffusers_state_dict(weights_path(name)), cfg)
    kwargs = dit_kwargs_from_diffusers(cfg)
    size, channels = kwargs.pop("image_size"), kwargs.pop("channels")
    model = DiT(**kwargs, dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype])
    return model, params, (size, size, channels)


def setup_torch():
    import torch

    torch.set_num_threads(THREADS)
    return torch


def num_params(name: str) -> int:
    """Parameter count of config `name` (from the saved weights)."""
    from safetensors.numpy import load_file

    return sum(v.size for v in load_file(weights_path(name)).values())


# ---------------------------------------------------------------------------------------------
# Reporting.


def machine() -> dict[str, Any]:
    """Where and when: load average, cores, versions (read without importing the frameworks)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("jax", "jaxlib", "flax", "torch", "diffusers"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "cpu_count": os.cpu_count(), "threads": THREADS, "versions": versions}


def table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table; columns are (key, header, format) and missing cells print '-'."""
    def cell(row, key, fmt):
        value = row.get(key)
        if value is None:
            return "-"
        return format(value, fmt) if fmt else str(value)

    cells = [[header for _, header, _ in columns]]
    cells += [[cell(row, key, fmt) for key, _, fmt in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def progress(row: dict[str, Any]) -> None:
    """One line per finished worker, so a long run shows where it is."""
    what = " ".join(str(row[k]) for k in ("config", "impl", "dtype", "method", "options")
                    if row.get(k))
    status = row.get("error") or f"median {row['median_s']:.3f}s"
    print(f"  {what}: {status}", flush=True)


def report(name: str, title: str, batch: int, repeats: int, peak: dict[str, Any],
           results: list[dict[str, Any]], columns: Sequence[tuple[str, str, str]], *,
           bf16: bool = False) -> dict[str, Any]:
    """Prints `results` as a table under `title` and the matmul peak, writes them as
    `results/<name>` (`write_results`) and returns what was written."""
    line = (f"\n{title}, batch {batch}, median of {repeats}; dense matmul peak "
            f"f32 {peak.get('float32_flops_per_s', 0) / 1e9:.1f} GFLOP/s")
    if bf16:
        line += f", bf16 {peak.get('bfloat16_flops_per_s', 0) / 1e9:.1f} GFLOP/s"
    print(line)
    print(table(results, columns))
    payload = {"batch": batch, "repeats": repeats, "matmul_peak": peak, "results": results}
    print("wrote", write_results(name, payload))
    return payload


def write_results(name: str, payload: dict[str, Any]) -> str:
    """Writes benchmarks/results/<name>.json (git-ignored) and returns its path."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"machine": machine(), **payload}, f, indent=2)
    return path


def ensure_weights(names: Sequence[str]) -> None:
    """Creates the saved weights of `names` (in a worker, so this process never imports torch)."""
    missing = [n for n in names if not os.path.exists(weights_path(n))]
    if missing:
        result = run_worker(__file__, {"make_weights": missing})
        if "error" in result:
            raise RuntimeError(f"could not create weights {missing}: {result['error']}")


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    return {"weights": [make_weights(n) for n in spec["make_weights"]]}


if __name__ == "__main__":
    worker_main(_measure)
