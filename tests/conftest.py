import os

# Tests run on the CPU, with two host devices so data-parallel code is exercised on one machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
