"""Backend choices (ci_jax.kernels): the CPU convolutions against XLA's, and the XLA flags that
entry points set (and importing ci_jax does not)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ci_jax import kernels


@pytest.mark.parametrize("cin, stride", [(4, 1), (4, 2), (1, 1), (1, 2)])  # cin 1, stride 1: taps
def test_conv_values_and_gradients_match_xla(cin, stride):
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, cin))
    w = jax.random.normal(jax.random.key(1), (3, 3, cin, 5))
    for pad in (((1, 1), (1, 1)), ((0, 1), (2, 0))):
        np.testing.assert_allclose(kernels._conv(x, w, stride, pad), kernels._lax_conv(x, w, stride, pad),
                                   rtol=1e-5, atol=1e-5)
        f_ours = lambda x, w: jnp.sum(kernels._conv(x, w, stride, pad) ** 2)
        f_xla = lambda x, w: jnp.sum(kernels._lax_conv(x, w, stride, pad) ** 2)
        for a, b in zip(jax.grad(f_ours, (0, 1))(x, w), jax.grad(f_xla, (0, 1))(x, w)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_tap_conv_is_the_one_channel_convolution():
    x = jax.random.normal(jax.random.key(2), (3, 8, 8, 1))
    w = jax.random.normal(jax.random.key(3), (3, 3, 1, 4))
    pad = ((1, 1), (1, 1))
    np.testing.assert_allclose(kernels.tap_conv(x, w, pad), kernels._lax_conv(x, w, 1, pad), rtol=1e-5, atol=1e-5)


def test_each_backend_gets_its_convolution():
    assert kernels.conv_for("cpu") is kernels.cpu_conv
    assert kernels.conv_for("gpu") is jax.lax.conv_general_dilated
    assert kernels.conv_for("tpu") is jax.lax.conv_general_dilated


def test_xla_flags_keep_the_users_setting_and_add_what_is_asked(monkeypatch):
    monkeypatch.setattr(kernels, "_jaxlib_version", lambda: (0, 9))
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1")
    assert kernels.xla_flags() == "--xla_cpu_foo=1"
    assert kernels.xla_flags(2) == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=2"
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
    assert kernels.xla_flags(2) == "--xla_force_host_platform_device_count=3"
    # Only the jaxlib line whose XLA knows the YNNPACK flag gets it (XLA aborts on unknown flags).
    monkeypatch.setattr(kernels, "_jaxlib_version", lambda: (0, 10))
    monkeypatch.delenv("XLA_FLAGS")
    assert kernels.xla_flags() == "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-dot"
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=none")
    assert kernels.xla_flags() == "--xla_cpu_experimental_ynn_fusion_type=none"


def test_importing_ci_jax_leaves_xla_flags_alone():
    import os
    import subprocess
    import sys

    code = "import os, ci_jax, ci_jax.models, ci_jax.train; print(os.environ.get('XLA_FLAGS', 'unset'))"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "unset"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU setting")
def test_cpu_convolutions_use_eigen_not_ynnpack():
    """The suite (as the CLI) turns XLA:CPU's YNNPACK convolutions off (slower for these shapes, see
    kernels.xla_flags)."""
    x = jnp.ones((128, 28, 28, 16))  # small batches go to Eigen either way
    w = jnp.ones((3, 3, 16, 16))
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(kernels._conv(x, w, 1, ((1, 1), (1, 1)))), (0, 1)))
    hlo = grad.lower(x, w).compile().as_text()
    assert "convolution" in hlo and "__ynn_fusion" not in hlo


def test_importing_ci_jax_changes_no_environment_variable():
    import subprocess
    import sys

    code = ("import os, json; before = dict(os.environ); import ci_jax, ci_jax.cli, ci_jax.config, ci_jax.train, "
            "ci_jax.experiment, ci_jax.sweep, ci_jax.stack; print(json.dumps(dict(os.environ) == before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "true"
