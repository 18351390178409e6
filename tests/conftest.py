import os

# Two CPU devices, as `ci-jax` itself sets up on a 2-core machine: the tests then run the
# sharded (data-parallel) code path. Must precede the first import of jax.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
