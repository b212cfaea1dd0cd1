"""Per-device train-state memory of DiT-XL/2 (arXiv 2212.09748; 675M parameters) with the
training mesh's fsdp axis, from the shardings alone: `jax.eval_shape` of the train state
(params, EMA, AdamW's two moments, step) and, per leaf, `NamedSharding.shard_shape` of
`sharding.state_shardings` on an abstract (1, fsdp) mesh. Nothing is allocated, no device needed.

    .venv/bin/python benchmarks/train_state_memory.py [--fsdp 1 2 4 8]

The model is DiT-XL/2 as published (32x32x4 latents of a 256x256 image, 1000 classes, learned
sigma), trained as `experiments/cifar_dit.py` trains (AdamW, EMA); activations are not counted.
"""

from __future__ import annotations

import argparse
import functools
import math

from common import write_results


def per_device_bytes(fsdp_sizes: list[int]) -> list[dict]:
    import jax
    import numpy as np
    from jax.sharding import AbstractMesh

    from experiments import cifar_dit
    from jaxdiff.models import DIT_CONFIGS, create_model
    from jaxdiff.optimizers import create_optimizer
    from jaxdiff.sharding import state_shardings
    from jaxdiff.train import create_train_state

    config = cifar_dit.get_config()
    config.model.update(DIT_CONFIGS["DiT-XL/2"])
    config.data.image_size, config.data.channels, config.data.num_classes = 32, 4, 1000
    create = functools.partial(create_train_state, config, create_model(config),
                               tx=create_optimizer(config))
    state = jax.eval_shape(create, rng=jax.random.key(0))
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    rows = []
    for fsdp in fsdp_sizes:
        shardings = state_shardings(state, AbstractMesh((1, fsdp), ("data", "fsdp")))
        held = sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings),
                                   strict=True))
        rows.append({"devices": fsdp, "params": params, "bytes_per_device": held})
    whole = rows[0]["bytes_per_device"] * fsdp_sizes[0]
    for row in rows:
        row["fraction_of_replicated"] = row["bytes_per_device"] / whole
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fsdp", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    rows = per_device_bytes(args.fsdp)
    print(f"DiT-XL/2 train state ({rows[0]['params'] / 1e6:.1f}M parameters; params, EMA, "
          "AdamW moments), per device, mesh (data=1, fsdp=N)")
    print("| devices (fsdp) | GB per device | of the replicated state |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['devices']} | {row['bytes_per_device'] / 1e9:.2f} | "
              f"{row['fraction_of_replicated']:.3f} |")
    print("wrote", write_results("train_state_memory", {"model": "DiT-XL/2", "results": rows}))


if __name__ == "__main__":
    main()
