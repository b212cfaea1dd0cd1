"""Input pipeline images/s per core, against the training step's images/s in the same run.

    .venv/bin/python benchmarks/input_pipeline.py [--quick] [--examples 50000] [--batch 128]

- in memory: a cifar10-shaped split (tfds' mock records, 32x32x3) decoded once into the uint8
  cache and batched by `Dataset.batch` on one thread (images/s per core), and through
  `Dataset.iterate` (its background thread, the consumer doing nothing);
- decoded per batch: a CelebA-shaped split (mock records 218x178x3, centre crop 140, bicubic
  resize to 64) above `data.memory_budget_mb`, through grain with 1 and 2 worker processes
  (images/s, and per worker), and by `Dataset.batch` in one process. tfds' mock records are
  arrays: the JPEG decoding of real CelebA records is not in these figures;
- the training step: `experiments/cifar.py`'s (the DDPM CIFAR-10 network) on one device, fed
  uint8 batches, images/s after compiling; and the issue's GPU goal, ~12,000 images/s per device.

Each measurement runs in its own worker process (`common.run_worker`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from common import run_worker, table, worker_main, write_results

ROUNDS = 5
GPU_GOAL = 12_000  # images/s per device: the DDPM CIFAR-10 step at 40% of an H100's bf16 peak


def _config(name: str, batch: int, **fields):
    from jaxdiff.config import default_config

    config = default_config()
    config.training.batch_size = batch
    config.data.dataset = name
    config.data.channels = 3
    config.data.num_classes = 10 if name == "cifar10" else 0
    config.data.random_flip = True
    for key, value in fields.items():
        config.data[key] = value
    return config


def _rate(images: int, seconds: float) -> dict:
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def measure_data(spec: dict) -> dict:
    import tensorflow_datasets as tfds

    from jaxdiff import data

    name = spec["dataset"]
    fields = dict(image_size=32 if name == "cifar10" else 64, cache_dir=spec["cache_dir"])
    if spec["path"] != "in_memory":
        fields.update(memory_budget_mb=0.0, num_workers=spec.get("workers", 0))
    batch, steps = spec["batch"], spec["steps"]
    with tfds.testing.mock_data(num_examples=spec["examples"],
                                policy=tfds.testing.MockPolicy.USE_CODE):
        start = time.perf_counter()
        ds = data.create_dataset(_config(name, batch, **fields))
        opened = time.perf_counter() - start
        if spec["path"] == "grain":
            batches = ds.iterate(0)
            start = time.perf_counter()
            for _ in range(spec["warmup"]):
                next(batches)
            started = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(steps):
                next(batches)
            result = _rate(steps * batch, time.perf_counter() - start)
            batches.close()
            per = spec["workers"]
            return {**result, "open_s": opened, "startup_s": started,
                    "per_core": result["images_per_s"] / per}
        ds.batch(0)  # touches the code paths once
        rates = []  # the median of ROUNDS rounds: a shared machine's speed moves
        for r in range(ROUNDS):
            start = time.perf_counter()
            for step in range(r * steps, (r + 1) * steps):
                ds.batch(step)
            rates.append(steps * batch / (time.perf_counter() - start))
        result = {"images": ROUNDS * steps * batch, "images_per_s": statistics.median(rates),
                  "rounds_images_per_s": rates}
        if spec["path"] == "in_memory":
            batches = ds.iterate(0)
            next(batches)
            start = time.perf_counter()
            for _ in range(steps):
                next(batches)
            result["iterate_images_per_s"] = steps * batch / (time.perf_counter() - start)
            batches.close()
        return {**result, "open_s": opened, "per_core": result["images_per_s"]}


def measure_step(spec: dict) -> dict:
    import jax
    import numpy as np

    from experiments import cifar
    from jaxdiff.sharding import shard_state
    from jaxdiff.train import train_functions

    config = cifar.get_config()
    config.training.batch_size = spec["batch"]
    if spec.get("tiny"):
        config.model.ch, config.model.ch_mult, config.model.attn_resolutions = 32, (1, 2), ()
    devices = [jax.devices()[0]]
    fns = train_functions(config, devices=devices)
    state = shard_state(fns.init_state(jax.random.key(0)), fns.shardings)
    pixels = np.random.default_rng(0).integers(0, 256, (1, 1, spec["batch"], 32, 32, 3))
    batches = {"x": pixels.astype(np.uint8), "label": np.zeros((1, 1, spec["batch"]), np.int32)}
    rng = jax.random.key(2)
    holder = [state]

    def step():
        holder[0], metrics = fns.p_train_steps(holder[0], batches, rng, None)
        jax.block_until_ready((holder[0], metrics))

    start = time.perf_counter()
    step()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    return {**_rate(spec["steps"] * spec["batch"], time.perf_counter() - start),
            "compile_s": compile_s}


def measure(spec: dict) -> dict:
    return measure_step(spec) if spec["path"] == "train_step" else measure_data(spec)


COLUMNS = (("what", "what", ""), ("images_per_s", "img/s", ",.1f"),
           ("per_core", "img/s per core", ",.0f"),
           ("iterate_images_per_s", "iterate img/s", ",.0f"),
           ("vs_step", "x train step", ",.0f"), ("vs_gpu_goal", "x GPU goal", ".2f"),
           ("open_s", "open s", ".1f"), ("startup_s", "start s", ".1f"),
           ("error", "error", ""))


def run(examples: int, batch: int, steps: int, step_batch: int, quick: bool) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        common = {"batch": batch, "cache_dir": cache_dir}
        specs = [
            ("in memory (cifar10 32x32x3, cache built)",
             {"path": "in_memory", "dataset": "cifar10", "examples": examples, "steps": steps}),
            ("in memory (cache read back)",
             {"path": "in_memory", "dataset": "cifar10", "examples": examples, "steps": steps}),
            ("decoded per batch, 1 process (celeb_a-like -> 64x64)",
             {"path": "decoded", "dataset": "celeb_a", "examples": 4 * batch,
              "steps": max(2, steps // 40)}),
        ] + [(f"grain, {w} worker(s) (celeb_a-like -> 64x64)",
              {"path": "grain", "dataset": "celeb_a", "examples": 4 * batch, "workers": w,
               "warmup": 2, "steps": max(8, steps // 10)}) for w in (1, 2)]
        for what, spec in specs:
            row = {"what": what, **spec}
            row.update(run_worker(__file__, {**common, **spec}))
            rows.append(row)
            print(f"  {what}: {row.get('error') or format(row['images_per_s'], ',.0f')} img/s",
                  flush=True)
    step = {"what": f"train step, cifar.py{' (tiny net)' if quick else ''}, batch {step_batch}, "
                    f"1 CPU device", "path": "train_step", "batch": step_batch, "steps": 3,
            "tiny": quick}
    step.update(run_worker(__file__, step))
    print(f"  {step['what']}: {step.get('error') or format(step['images_per_s'], ',.2f')} img/s",
          flush=True)
    rows.append(step)
    step_rate = step.get("images_per_s")
    for row in rows[:-1]:
        if "error" not in row:
            if step_rate:
                row["vs_step"] = row["images_per_s"] / step_rate
            row["vs_gpu_goal"] = row["images_per_s"] / GPU_GOAL
    print(f"\nInput pipeline, batch {batch}; GPU goal {GPU_GOAL:,} img/s per device")
    print(table(rows, COLUMNS))
    payload = {"batch": batch, "examples": examples, "gpu_goal": GPU_GOAL, "results": rows}
    print("wrote", write_results("input_pipeline", payload))
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="5,000 examples, 40 steps, a tiny network's step")
    parser.add_argument("--examples", type=int, default=None)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None,
                        help="batches timed in each of the in-memory path's rounds")
    parser.add_argument("--step-batch", type=int, default=16, help="the training step's batch")
    args = parser.parse_args()
    run(args.examples or (5_000 if args.quick else 50_000), args.batch,
        args.steps or (40 if args.quick else 200), args.step_batch, args.quick)


if __name__ == "__main__":
    if not worker_main(measure):
        main()
