# The suite runs on one CPU device. Forced multi-device CPU runs are opt-in
# (CI_JAX_CPU_DEVICES, see ci_jax/cli.py) after XLA:CPU's in-process all-reduce aborted twice.
