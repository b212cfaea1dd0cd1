import gc
import os

# Tests run on the CPU, with two host devices so data-parallel code is exercised on one machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402  (after the environment it reads)
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """After each test module, JAX's compiled programs and jaxdiff's per-config caches of them
    are dropped. An xdist worker runs a few hundred modules' tests in one process; kept, what they
    compile grew a worker steadily to 5.7 GB by two thirds of `make test-all` (and a worker died
    late in a CI run's slow tier). Dropped, three modules (contract, processes,
    parameterisations) end at 1.69 GB instead of 1.96."""
    yield
    from jaxdiff import likelihood, train

    train._train_functions.cache_clear()
    likelihood._MODEL_DENOISERS.clear()
    jax.clear_caches()
    gc.collect()
