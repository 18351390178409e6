"""SIG's clean-label sinusoid (ci_jax.attacks.sig)."""

import numpy as np

from ci_jax.attacks import sig

from helpers import build_attack


# -- SIG --------------------------------------------------------------------------------------------
def test_sig_is_a_horizontal_sinusoid_on_target_images():
    v = sig.sinusoid_W(8, 0.1, 2.0)
    # sin(2 pi j 2 / 8) for j = 0..7: 0, 1, 0, -1, 0, 1, 0, -1
    assert np.allclose(v, 0.1 * np.array([0, 1, 0, -1, 0, 1, 0, -1]), atol=1e-7)
    x = np.full((2, 8, 8, 1), 0.5, np.float32)
    a = build_attack("sig", delta=0.1, frequency=2.0, test_gain=2.0)
    train, test = a.stamp(x, None, test=False), a.stamp(x, None, test=True)
    assert np.allclose(train[0, 3, :, 0], 0.5 + v) and np.allclose(test[0, 5, :, 0], 0.5 + 2 * v)
    assert a.clean_label
