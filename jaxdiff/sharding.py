"""The training mesh and the train state's place on it: the devices as a ("data", "fsdp") mesh
(`training.mesh`), each leaf of the state sharded along "fsdp" on its largest dimension that
divides (ZeRO-3 / FSDP: Rajbhandari et al., arXiv 1910.02054), replicated across "data"; the
batch split over both axes. `jaxdiff.train` places, restores and steps the state by these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

# The training mesh's axes, both of which split the batch.
DEVICE_AXES = ("data", "fsdp")


def device_mesh(devices: Sequence[jax.Device], fsdp: int = 1) -> jax.sharding.Mesh:
    """The training step's mesh: `devices` as (data, fsdp) = (len(devices) / fsdp, fsdp)."""
    return jax.sharding.Mesh(np.array(devices).reshape(-1, fsdp), DEVICE_AXES)


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """Arrays [devices, ...] split along both mesh axes, one slice per device."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DEVICE_AXES))


def fsdp_dim(shape: Sequence[int], fsdp: int) -> int | None:
    """The dimension a leaf of the train state is sharded along over "fsdp": its largest that
    fsdp divides (the first of equals); None (replicated) if fsdp is 1 or divides none."""
    dims = [d for d, n in enumerate(shape) if fsdp > 1 and n > 0 and n % fsdp == 0]
    return max(dims, key=lambda d: shape[d], default=None)


def spec(dim: int | None) -> jax.sharding.PartitionSpec:
    return jax.sharding.PartitionSpec(*[None] * dim, "fsdp") if dim is not None \
        else jax.sharding.PartitionSpec()


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh) -> Any:
    """The sharding of every leaf of a train state (arrays or `jax.ShapeDtypeStruct`) on `mesh`:
    along "fsdp" on its `fsdp_dim`, replicated across "data" (and scalars everywhere). Init,
    restore and the step all place the state by it."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: jax.sharding.NamedSharding(mesh, spec(fsdp_dim(x.shape, fsdp))), abstract_state)


def shard_state(state: Any, shardings: Any) -> Any:
    """`state` (host or device arrays) placed as `shardings` (`state_shardings`) says, every
    leaf in buffers of its own: the step donates them, so none may be the caller's or another
    leaf's (`_from_teacher`'s weights, EMA and target are one set of arrays; aliased, the step
    freed buffers it still read and crashed the process). It holds two copies of the state for
    a moment; a state that `init_state` made or a checkpoint restored needs none of this.

    The shardings may span several processes; each must pass the same `state`.
    """
    placed = jax.tree.map(jax.device_put, state, shardings)
    # A copy on the devices: device_put keeps an array's buffer where it already lies (even
    # with may_alias=False, from one device onto a mesh that holds it), and a jitted copy
    # writes every output to a buffer of its own.
    return jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=shardings)(placed)


def replicated(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """`tree` as global arrays with a whole copy on every device of `mesh` (CD's teacher, LPIPS)."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def to_host(tree: Any) -> Any:
    """The global arrays of `tree` as whole host arrays (every process must call it: an array
    sharded across processes is gathered from all of them)."""
    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)
