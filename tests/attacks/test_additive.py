"""The CI authors' small additive patterns (ci_jax.attacks.additive): chessboard, static, cross and
fourpixel, placed by hand."""

import numpy as np

from helpers import build_attack


# -- the CI authors' patterns: placement by hand ---------------------------------------------------
def test_chessboard_and_static_masks():
    a = build_attack("chessboard")
    m = a.mask_HW(4, 4)
    assert m.tolist() == [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]
    s = build_attack("static").mask_HW(4, 4)
    assert s.tolist() == [[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]


def test_additive_pattern_is_three_levels_of_255_and_quantised():
    x = np.full((1, 8, 8, 1), 10 / 255, np.float32)
    out = build_attack("static").stamp(x, None, test=False)
    on = build_attack("static").mask_HW(8, 8).astype(bool)
    assert np.allclose(out[0, on, 0] * 255, 13) and np.allclose(out[0, ~on, 0] * 255, 10)
    assert np.allclose(out * 255, np.round(out * 255), atol=1e-4)  # on the 8-bit grid
    top = np.ones((1, 8, 8, 1), np.float32)
    assert build_attack("chessboard").stamp(top, None, test=False).max() == 1.0  # clipped


def test_cross_is_five_pixels_in_the_authors_range_and_fixed_per_seed():
    a = build_attack("cross", pattern_seed=3)
    m = a.mask_HW(28, 28)
    assert m.sum() == 5
    (r, c), = np.argwhere(m * (np.roll(m, 1, 0) + np.roll(m, -1, 0)) * (np.roll(m, 1, 1) + np.roll(m, -1, 1)) > 0)
    assert 3 <= r <= 24 and 3 <= c <= 24
    assert m[r - 1, c] == m[r + 1, c] == m[r, c - 1] == m[r, c + 1] == 1
    assert np.array_equal(m, build_attack("cross", pattern_seed=3).mask_HW(28, 28))
    assert not np.array_equal(m, build_attack("cross", pattern_seed=4).mask_HW(28, 28))


def test_fourpixel_is_four_distinct_pixels():
    for seed in range(20):
        m = build_attack("fourpixel", pattern_seed=seed).mask_HW(28, 28)
        assert m.sum() == 4 and m[:3].sum() == m[-3:].sum() == 0
