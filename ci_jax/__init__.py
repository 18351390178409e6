"""Backdoor data-poisoning attacks and the Cluster Impurity defense, in JAX/Flax."""

import os as _os
from importlib import metadata as _metadata

# XLA:CPU (jax 0.10) hands convolutions to YNNPACK by default; for ResNet-20's 16-64 channel
# 3x3 convs, Eigen's kernels were faster here (2-core Cascade Lake, batch 128, ms per conv
# fwd / input-grad / kernel-grad: 16 channels 11.0/10.5/27.5 -> 8.0/9.2/15.5, 32 channels
# 6.7/7.1/26.6 -> 4.6/4.3/8.8, 64 channels 8.8/8.9/18.8 -> 3.8/3.6/5.7). Its "dot" fusions also
# swallow the 64-channel stage of the inference pass (convolutions included) and ran it slower
# than Eigen: the features pass at batch 64 went from ~1,360 to ~1,520 img/s without them (train
# step unchanged). Set here, before JAX starts a backend, so the CLI, the tests and library use
# all get it; a user's own setting wins.
_YNN = "--xla_cpu_experimental_ynn_fusion_type"


def _jaxlib_minor() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in _metadata.version("jaxlib").split(".")[:2])
    except (_metadata.PackageNotFoundError, ValueError):
        return ()


# XLA aborts on a flag it does not know, and XLA_FLAGS reaches every backend (a GPU process too):
# only the jaxlib line where the flag was checked gets it.
if _YNN not in _os.environ.get("XLA_FLAGS", "") and _jaxlib_minor() == (0, 10):
    _os.environ["XLA_FLAGS"] = f"{_os.environ.get('XLA_FLAGS', '')} {_YNN}=-individual_convolution,-dot".strip()
