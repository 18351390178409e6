"""Backdoor data-poisoning attacks and the defenses that clean a poisoned training set, in
JAX/Flax, around the Cluster Impurity defense (Xiang, Miller, Kesidis, MLSP 2019).

Importing the package changes nothing in the environment: XLA flags are set by the entry points
(`ci_jax.cli`, the test suite) through `kernels.xla_flags`.
"""
