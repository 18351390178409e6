"""Blended injection (ci_jax.attacks.blend)."""

import numpy as np

from ci_jax.attacks import blend

from helpers import C, H, RNG, W, config_error, four_class_images, target


def test_blend_mixes_a_fixed_seeded_pattern_everywhere():
    x_NHWC, _ = four_class_images()
    make = lambda alpha, seed: blend.Blend(blend.Settings(alpha=alpha, pattern_seed=seed), target())
    out_NHWC = make(0.2, 3).stamp(x_NHWC, RNG, test=False)
    pattern_HWC = np.random.default_rng(3).uniform(0, 1, (H, W, C)).astype(np.float32)
    np.testing.assert_allclose(out_NHWC, 0.8 * x_NHWC + 0.2 * pattern_HWC[None], rtol=1e-6)
    np.testing.assert_array_equal(out_NHWC, make(0.2, 3).stamp(x_NHWC, np.random.default_rng(9), test=True))
    assert not np.array_equal(out_NHWC, make(0.2, 4).stamp(x_NHWC, RNG, test=False))
    assert out_NHWC.min() >= 0 and out_NHWC.max() <= 1
    assert "attack.blend.alpha" in str(config_error({"attack.blend.alpha": 1.5}))
