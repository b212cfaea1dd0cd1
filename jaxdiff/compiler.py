"""XLA options per backend for everything jaxdiff compiles: the samplers, bits/dim, FID features
(`inference_jit`) and the training step (`training_jit`). They were chosen by measurement:
`benchmarks/`, and the README's "Performance" table of what each gave.

On the CPU, two XLA:CPU options are off:
- YNNPACK fusion (jaxlib 0.10). It runs the U-Net's convolutions slower than XLA's Eigen
  ones. Switching it off gave +22% images/s forward in float32 and +23% in bfloat16 on the
  DDPM CIFAR-10 network (+60% at half its width), and +10% per training step.
- The concurrency-optimised scheduler, which runs independent operations side by side. On
  2 cores, one operation at a time over both was 5-12% faster forward and 2-14% faster per
  training step. (With it on, YNNPACK's backward convolutions had been the faster ones.)

Other backends compile with XLA's defaults. An option the user sets in XLA_FLAGS wins: it is
not overridden here.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax

OPTIONS: dict[str, dict[str, Any]] = {
    "cpu": {"xla_cpu_experimental_ynn_fusion_type": "",
            "xla_cpu_enable_concurrency_optimized_scheduler": False},
}


def compiler_options(backend: str | None = None) -> dict[str, Any] | None:
    """The options of `OPTIONS` for `backend` (default: JAX's), less any that XLA_FLAGS sets;
    None when there are none."""
    user_flags = os.environ.get("XLA_FLAGS", "")
    options = {name: value for name, value in
               OPTIONS.get(backend or jax.default_backend(), {}).items()
               if f"--{name}=" not in user_flags}
    return options or None


class _InferenceJit:
    """`jax.jit(fun, compiler_options=compiler_options(), **jit_kwargs)`, built at the first
    call rather than at import, so that importing jaxdiff does not start JAX's backends (and
    `jax.distributed.initialize` can still come first). Called inside another jitted function
    (compiler options belong to the outermost one only), it is a plain `jax.jit`."""

    def __init__(self, fun: Callable, jit_kwargs: dict[str, Any]):
        functools.update_wrapper(self, fun)
        self._fun, self._jit_kwargs, self._jitted = fun, jit_kwargs, None
        self._nested = jax.jit(fun, **jit_kwargs)

    def _jit(self):
        if self._jitted is None:
            self._jitted = jax.jit(self._fun, compiler_options=compiler_options(),
                                   **self._jit_kwargs)
        return self._jitted

    def __call__(self, *args, **kwargs):
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs))):
            return self._nested(*args, **kwargs)
        return self._jit()(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._jit().lower(*args, **kwargs)


def inference_jit(fun: Callable | None = None, /, **jit_kwargs) -> Any:
    """`jax.jit` for inference, with the backend's `compiler_options`; usable as a decorator,
    with or without `jax.jit`'s keyword arguments."""
    if fun is None:
        return functools.partial(inference_jit, **jit_kwargs)
    return _InferenceJit(fun, jit_kwargs)


def training_jit(fun: Callable, mesh: jax.sharding.Mesh, **jit_kwargs) -> Callable:
    """`jax.jit(fun, **jit_kwargs)` with the `compiler_options` of the mesh's backend: the
    training step over the global arrays of `mesh` (its per-device part a `jax.shard_map`), in
    one or several processes."""
    options = compiler_options(mesh.devices.flat[0].platform)
    return jax.jit(fun, compiler_options=options, **jit_kwargs)
