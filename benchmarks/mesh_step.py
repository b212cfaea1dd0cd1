"""The training step on a ("data", "fsdp") mesh written two ways, measured in one run: jaxdiff's
(`train.mesh_gradients`: the per-device program under `jax.shard_map`, the fsdp-sharded weights
all-gathered and the gradients reduce-scattered by hand) and the same per-device program under
plain `jax.jit` with the train state's shardings (nested `jax.vmap` over the mesh's axis names,
so that the compiler, GSPMD, partitions it and picks the collectives). Both end in
`train.apply_gradients`, start from the same state and batches and draw the same randomness.

    .venv/bin/python benchmarks/mesh_step.py [--devices 4] [--steps 3] [--repeats 5]

Each model runs in a worker process with `--xla_force_host_platform_device_count=DEVICES`, on the
meshes DEVICESx1, 2x(DEVICES/2) and 1xDEVICES. Per row: the largest |difference| of the weights
after `--steps` steps, the median seconds per step of each (the shard_map and jit calls
alternate, so a busy machine slows both alike) and their ratio, and each compiled program's
per-device memory from XLA's `memory_analysis` (arguments + temporaries). On XLA:CPU the "devices"
share the host's cores and a collective is a copy in memory: the ratio shows the programs'
overhead, not an interconnect's. Results go to benchmarks/results/mesh_step.json.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import statistics
import time

from common import run_worker, worker_main, write_results

MODELS = {"digits U-Net": "digits", "digits DiT": "digits_dit"}  # name: experiments/<file>.py


def jit_gradients(state, batch, rng, frozen, *, config, model, process, mesh, teacher,
                  blocks: tuple[int, int]):
    """`train.mesh_gradients`' result, written for `jax.jit` alone: the batch in blocks
    (data, fsdp) through `_device_loss_and_grads` under `jax.vmap` over those axis names, with
    the whole (unsharded, in the global view) weights; the gradients' mean is constrained to the
    params' sharding and GSPMD partitions the rest. Blocks (1, 1): the whole batch as one
    program, as a GSPMD step is usually written (each example's t and noise are keyed by its
    global index either way; dropout then draws one mask stream for the batch, not one per
    device, so its weights differ from the per-device step's where the network has dropout)."""
    import jax

    from jaxdiff import sharding, train
    from jaxdiff.objectives import DEVICE_AXES

    loss_and_grads = functools.partial(train._device_loss_and_grads, config=config, model=model,
                                       process=process, teacher=teacher)

    def on_device(block):
        grads, metrics = loss_and_grads(state.params, state.target_params, state.step, block,
                                        rng, {} if frozen is None else frozen)
        return jax.lax.pmean((grads, metrics), DEVICE_AXES)

    data, fsdp = blocks
    split = jax.tree.map(lambda b: b.reshape(data, fsdp, -1, *b.shape[2:]), batch)
    grads, metrics = jax.vmap(jax.vmap(on_device, axis_name="fsdp", out_axes=None),
                              axis_name="data", out_axes=None)(split)
    params_sharding = sharding.state_shardings(state, mesh).params
    return jax.lax.with_sharding_constraint(grads, params_sharding), metrics


def _per_device_bytes(compiled) -> int | None:
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.temp_size_in_bytes)


def measure(spec: dict) -> dict:
    import jax
    import numpy as np

    from jaxdiff import sharding, train
    from jaxdiff.compiler import training_jit
    from jaxdiff.data import create_dataset

    config = importlib.import_module(f"experiments.{MODELS[spec['model']]}").get_config()
    config.training.mesh.data, config.training.mesh.fsdp = spec["data"], spec["fsdp"]
    fns = train.train_functions(config)
    mesh, n = fns.mesh, spec["data"] * spec["fsdp"]
    dataset = create_dataset(config)
    batches = [jax.tree.map(lambda v: v.reshape(n, 1, *v.shape[1:]), dataset.batch(s))
               for s in range(spec["steps"])]  # [devices, steps per call, per_device, ...]
    rng = jax.random.key(7)
    start = fns.init_state(jax.random.key(0))
    host = sharding.to_host(start)

    def jit_step(state, batches, rng, frozen, blocks):
        batch = jax.tree.map(lambda b: b[:, 0], batches)
        grads, metrics = jit_gradients(state, batch, rng, frozen, config=config, model=fns.model,
                                       process=fns.process, mesh=mesh, teacher=None,
                                       blocks=blocks)
        return train.apply_gradients(state, grads, metrics, config=config, tx=fns.tx)

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    steps = {"shard_map": fns.p_train_steps}
    for name, blocks in (("jit", (spec["data"], spec["fsdp"])), ("jit_global", (1, 1))):
        steps[name] = training_jit(
            functools.partial(jit_step, blocks=blocks), mesh,
            in_shardings=(fns.shardings, sharding.batch_sharding(mesh), replicated, replicated),
            out_shardings=(fns.shardings, replicated), donate_argnums=(0,))
    result, finals = {}, {}
    for name, step in steps.items():
        state = sharding.shard_state(host, fns.shardings)
        compiled = step.lower(state, batches[0], rng, {}).compile()
        result[f"{name}_bytes_per_device"] = _per_device_bytes(compiled)
        for batch in batches:
            state, _ = step(state, batch, rng, {})
        finals[name] = sharding.to_host(state.params)
    for name in ("jit", "jit_global"):
        result[f"{name}_weight_difference"] = max(
            float(np.max(np.abs(a - b))) for a, b in zip(
                jax.tree.leaves(finals["shard_map"]), jax.tree.leaves(finals[name]), strict=True))
    states = {name: sharding.shard_state(host, fns.shardings) for name in steps}
    times = {name: [] for name in steps}
    for _ in range(spec["repeats"]):
        for name, step in steps.items():  # alternating: a busy machine slows both alike
            begin = time.perf_counter()
            states[name], metrics = step(states[name], batches[0], rng, {})
            jax.block_until_ready((states[name], metrics))
            times[name].append(time.perf_counter() - begin)
    for name in steps:
        result[f"{name}_s"] = statistics.median(times[name])
        result[f"{name}_over_shard_map"] = result[f"{name}_s"] / result["shard_map_s"]
    result["dropout"] = float(config.model.get("dropout", 0.0))
    return result


def run(devices: int, steps: int, repeats: int) -> dict:
    meshes = [(devices, 1), (2, devices // 2), (1, devices)]
    rows = []
    for model in MODELS:
        for data, fsdp in meshes:
            spec = {"model": model, "data": data, "fsdp": fsdp, "steps": steps,
                    "repeats": repeats}
            row = {"model": model, "mesh": f"{data}x{fsdp}", **run_worker(
                __file__, spec, xla_flags=f"--xla_force_host_platform_device_count={devices}")}
            rows.append(row)
            print(row, flush=True)
    print(f"\nThe training step on {devices} XLA:CPU devices: shard_map (jaxdiff) vs jax.jit "
          "(GSPMD)")
    print("jit: the per-device blocks under vmap; jit_global: the whole batch as one program")
    print("| model | mesh (data x fsdp) | step | s / step | / shard_map | MB per device | "
          "max weight diff to shard_map (3 steps) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['mesh']} | error: {r['error']} |")
            continue
        for name in ("shard_map", "jit", "jit_global"):
            ratio = r.get(f"{name}_over_shard_map", 1.0)
            diff = r.get(f"{name}_weight_difference")
            print(f"| {r['model']} | {r['mesh']} | {name} | {r[f'{name}_s']:.3f} | {ratio:.2f} | "
                  f"{r[f'{name}_bytes_per_device'] / 2**20:.1f} | "
                  f"{'-' if diff is None else f'{diff:.1e}'} |")
    payload = {"devices": devices, "steps": steps, "repeats": repeats, "results": rows}
    print("wrote", write_results("mesh_step", payload))
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    run(args.devices, args.steps, args.repeats)


if __name__ == "__main__":
    if not worker_main(measure):
        main()
