"""XLA options per backend for everything jaxdiff compiles: the samplers, bits/dim, FID features
(`inference_jit`) and the training step (`training_pmap`). They were chosen by measurement:
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
import numpy as np

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


class _PmapWithOptions:
    """`pmapped` (a `jax.pmap`, which takes no compiler options) lowered and compiled with
    `options` once per argument signature (pytree structure, shapes and dtypes)."""

    def __init__(self, pmapped: Callable, options: dict[str, Any]):
        functools.update_wrapper(self, pmapped)
        self._pmapped, self._options, self._compiled = pmapped, options, {}

    def compile(self, *args) -> jax.stages.Compiled:
        """The executable that a call with `args` runs (compiled on first use)."""
        leaves, treedef = jax.tree.flatten(args)
        key = (treedef, tuple((np.shape(x), str(getattr(x, "dtype", type(x))),
                               getattr(x, "weak_type", False)) for x in leaves))
        if key not in self._compiled:
            self._compiled[key] = self._pmapped.lower(*args).compile(
                compiler_options=self._options)
        return self._compiled[key]

    def __call__(self, *args):
        return self.compile(*args)(*args)

    def lower(self, *args) -> jax.stages.Lowered:
        return self._pmapped.lower(*args)


def training_pmap(fun: Callable, **pmap_kwargs) -> Callable:
    """`jax.pmap(fun, **pmap_kwargs)`, compiled with the `compiler_options` of the devices'
    backend. A plain `jax.pmap` where there are none, and across several processes: there the
    pmap takes each process's local slices, which its compiled executable does not."""
    pmapped = jax.pmap(fun, **pmap_kwargs)
    devices = pmap_kwargs.get("devices")
    options = compiler_options(devices[0].platform if devices else None)
    if options is None or jax.process_count() > 1:
        return pmapped
    return _PmapWithOptions(pmapped, options)
