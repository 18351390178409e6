"""Every attack plug-in: where its trigger goes, its bookkeeping (poisons, covers, labels), its
determinism, its bounds, and its errors for bad settings."""

import math

import numpy as np
import pytest

from ci_jax import attacks, config
from ci_jax.attacks import bpp, sig, smooth, wanet
from ci_jax.errors import UserError

N_CLASSES = 10


def _data(n=400, side=28, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    # 8-bit values, as real images: quantising them again changes nothing but the trigger.
    x = (rng.integers(0, 256, (n, side, side, channels)) / 255).astype(np.float32)
    y = (np.arange(n) % N_CLASSES).astype(np.int32)
    return x, y


def _attack(name, n_poison=20, source=0, target=2, selection="first", seed=0, **fields):
    cfg = config.preset("default", {"attack.name": name, "attack.n_poison": n_poison, "attack.source": source,
                                    "attack.target": target, "attack.selection": selection, "seed": seed,
                                    **{f"attack.{name}.{k}": v for k, v in fields.items()}})
    t = attacks.Target(source, target, n_poison, selection, seed)
    return attacks.build(name, cfg.attack_settings(), t)


def test_every_attack_is_registered_and_has_a_config_section():
    assert set(attacks.NAMES) == {"none", "pixel", "patch", "blend", "chessboard", "static", "cross", "fourpixel",
                                  "sig", "wanet", "adaptive_blend", "bpp", "smooth"}
    for name, cls in attacks.REGISTRY.items():
        assert cls.__doc__ or cls.__module__, name
        if cls.Settings is not None:
            assert hasattr(config.Config().attack, name)


@pytest.mark.parametrize("name", [n for n in attacks.NAMES if n != "none"])
def test_bookkeeping_determinism_and_bounds(name):
    x, y = _data()
    a = _attack(name)
    p = attacks.poison_training_set(a, x, y, N_CLASSES)
    again = attacks.poison_training_set(_attack(name), x, y, N_CLASSES)
    assert np.array_equal(p.x_NHWC, again.x_NHWC) and np.array_equal(p.y_N, again.y_N)
    assert p.n_poison == 20 and not (p.is_poison_N & p.is_cover_N).any()
    assert p.n_cover == a.n_covers(20)
    untouched = ~p.is_poison_N & ~p.is_cover_N
    assert np.array_equal(p.x_NHWC[untouched], x[untouched]) and np.array_equal(p.y_N[untouched], y[untouched])
    if a.clean_label:
        assert (y[p.is_poison_N] == 2).all() and (p.y_N[p.is_poison_N] == 2).all()
    else:
        assert (y[p.is_poison_N] == 0).all() and (p.y_N[p.is_poison_N] == 2).all()
    assert np.array_equal(p.y_N[p.is_cover_N], y[p.is_cover_N])  # covers keep their labels
    assert (y[p.is_cover_N] != 2).all()
    changed = np.abs(p.x_NHWC - x).reshape(len(x), -1).max(1)
    assert (changed[p.is_poison_N] > 0).all()
    if name != "pixel":  # the seed's pixel is not clipped: 1 + 0.25 is allowed there
        assert p.x_NHWC.min() >= 0 and p.x_NHWC.max() <= 1
    t = attacks.triggered_test_set(a, x, y, N_CLASSES)
    assert t.x_NHWC.dtype == np.float32 and len(t.x_NHWC) == len(t.idx)


def test_random_selection_depends_on_the_seed_only():
    x, y = _data()
    pick = lambda seed: attacks.poison_training_set(_attack("patch", selection="random", seed=seed), x, y, N_CLASSES).poison_idx
    assert np.array_equal(pick(1), pick(1)) and not np.array_equal(pick(1), pick(2))


def test_asr_set_is_the_source_or_every_non_target_class():
    x, y = _data()
    assert set(y[attacks.triggered_test_set(_attack("patch"), x, y, N_CLASSES).idx]) == {0}
    all_to_one = attacks.triggered_test_set(_attack("patch", source=-1), x, y, N_CLASSES)
    assert set(y[all_to_one.idx]) == set(range(N_CLASSES)) - {2}
    clean_label = attacks.triggered_test_set(_attack("sig"), x, y, N_CLASSES)
    assert set(y[clean_label.idx]) == set(range(N_CLASSES)) - {2}
    assert "not of the target class 2" in clean_label.description
    none = attacks.triggered_test_set(_attack("none"), x, y, N_CLASSES)
    assert len(none.idx) == 0


def test_no_attack_poisons_nothing():
    x, y = _data()
    p = attacks.poison_training_set(_attack("none", n_poison=50), x, y, N_CLASSES)
    assert p.n_poison == 0 and np.array_equal(p.x_NHWC, x)


# -- the CI authors' patterns: placement by hand ---------------------------------------------------
def test_chessboard_and_static_masks():
    a = _attack("chessboard")
    m = a.mask_HW(4, 4)
    assert m.tolist() == [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]
    s = _attack("static").mask_HW(4, 4)
    assert s.tolist() == [[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]


def test_additive_pattern_is_three_levels_of_255_and_quantised():
    x = np.full((1, 8, 8, 1), 10 / 255, np.float32)
    out = _attack("static").stamp(x, None, test=False)
    on = _attack("static").mask_HW(8, 8).astype(bool)
    assert np.allclose(out[0, on, 0] * 255, 13) and np.allclose(out[0, ~on, 0] * 255, 10)
    assert np.allclose(out * 255, np.round(out * 255), atol=1e-4)  # on the 8-bit grid
    top = np.ones((1, 8, 8, 1), np.float32)
    assert _attack("chessboard").stamp(top, None, test=False).max() == 1.0  # clipped


def test_cross_is_five_pixels_in_the_authors_range_and_fixed_per_seed():
    a = _attack("cross", pattern_seed=3)
    m = a.mask_HW(28, 28)
    assert m.sum() == 5
    (r, c), = np.argwhere(m * (np.roll(m, 1, 0) + np.roll(m, -1, 0)) * (np.roll(m, 1, 1) + np.roll(m, -1, 1)) > 0)
    assert 3 <= r <= 24 and 3 <= c <= 24
    assert m[r - 1, c] == m[r + 1, c] == m[r, c - 1] == m[r, c + 1] == 1
    assert np.array_equal(m, _attack("cross", pattern_seed=3).mask_HW(28, 28))
    assert not np.array_equal(m, _attack("cross", pattern_seed=4).mask_HW(28, 28))


def test_fourpixel_is_four_distinct_pixels():
    for seed in range(20):
        m = _attack("fourpixel", pattern_seed=seed).mask_HW(28, 28)
        assert m.sum() == 4 and m[:3].sum() == m[-3:].sum() == 0


# -- SIG --------------------------------------------------------------------------------------------
def test_sig_is_a_horizontal_sinusoid_on_target_images():
    v = sig.sinusoid_W(8, 0.1, 2.0)
    # sin(2 pi j 2 / 8) for j = 0..7: 0, 1, 0, -1, 0, 1, 0, -1
    assert np.allclose(v, 0.1 * np.array([0, 1, 0, -1, 0, 1, 0, -1]), atol=1e-7)
    x = np.full((2, 8, 8, 1), 0.5, np.float32)
    a = _attack("sig", delta=0.1, frequency=2.0, test_gain=2.0)
    train, test = a.stamp(x, None, test=False), a.stamp(x, None, test=True)
    assert np.allclose(train[0, 3, :, 0], 0.5 + v) and np.allclose(test[0, 5, :, 0], 0.5 + 2 * v)
    assert a.clean_label


# -- WaNet ------------------------------------------------------------------------------------------
def test_bicubic_matrix_interpolates_and_keeps_constants():
    m = wanet.bicubic_matrix(4, 28)
    assert np.allclose(m.sum(1), 1.0)
    assert np.allclose(m[0], [1, 0, 0, 0]) and np.allclose(m[-1], [0, 0, 0, 1])  # align_corners
    nodes = np.isclose(np.linspace(0, 3, 28) % 1, 0)  # output pixels that sit on a control point
    assert np.allclose(m[nodes], np.eye(4))
    # Keys' weights with A = -0.75 half-way between points, by hand: 1 - 3.25/8 and 3 - 3.09375.
    assert np.allclose(wanet._cubic(np.array([0.5])), [[-0.09375, 0.59375, 0.59375, -0.09375]])


def test_warp_with_the_identity_grid_is_the_identity_and_a_shift_moves_pixels():
    x, _ = _data(n=3, side=8)
    a = np.linspace(-1, 1, 8)
    identity = np.stack(np.meshgrid(a, a, indexing="xy"), -1)
    assert np.allclose(wanet.warp(x, np.broadcast_to(identity, (3, 8, 8, 2))), x, atol=1e-6)
    shifted = identity.copy()
    shifted[..., 0] = np.clip(shifted[..., 0] + 2 / 7, -1, 1)  # sample one column to the right
    out = wanet.warp(x, np.broadcast_to(shifted, (3, 8, 8, 2)))
    assert np.allclose(out[:, :, :-1], x[:, :, 1:], atol=1e-6)


def test_wanet_field_is_small_and_fixed_and_covers_are_noisy():
    a = _attack("wanet", k=4, s=0.5)
    grid = wanet.sampling_grid(a.s, 28)
    lin = np.linspace(-1, 1, 28)
    identity = np.stack(np.meshgrid(lin, lin, indexing="xy"), -1)
    shift = np.abs(grid - identity)
    assert shift.max() > 0 and shift.mean() < 4 * 0.5 / 28
    x, _ = _data(n=4)
    assert np.array_equal(a.stamp(x, None, test=False), a.stamp(x, None, test=True))
    c1 = a.cover(x, np.random.default_rng(0))
    assert not np.allclose(c1, a.stamp(x, None, test=False))
    assert a.n_covers(100) == 200


# -- Adaptive-Blend ---------------------------------------------------------------------------------
def test_adaptive_blend_masks_keep_half_the_pieces():
    a = _attack("adaptive_blend")
    m = a.masks(50, 28, 28, np.random.default_rng(0))
    assert m.shape == (50, 28, 28) and set(np.unique(m)) == {0.0, 1.0}
    assert np.allclose(m.sum((1, 2)), 8 * 7 * 7)  # 8 pieces of 7x7
    blocks = m.reshape(50, 4, 7, 4, 7)
    assert (blocks.min((2, 4)) == blocks.max((2, 4))).all()  # whole pieces only
    assert len({tuple(row) for row in m.reshape(50, -1)}) > 40  # a fresh choice per image


def test_adaptive_blend_strengths_and_test_trigger():
    a = _attack("adaptive_blend")
    x = np.zeros((2, 28, 28, 1), np.float32)
    t = a.stamp(x, None, test=True)
    pattern = np.random.default_rng(0).uniform(0, 1, (28, 28, 1)).astype(np.float32)
    assert np.allclose(t[0], 0.2 * pattern)
    tr = a.stamp(x, np.random.default_rng(1), test=False)
    assert np.isclose(tr.max(), 0.15 * pattern.max(), atol=1e-6) and (tr == 0).mean() >= 0.5
    assert a.n_covers(30) == 30


def test_adaptive_blend_rejects_pieces_that_do_not_tile():
    with pytest.raises(UserError, match="square number"):
        config.preset("default", {"attack.name": "adaptive_blend", "attack.adaptive_blend.pieces": 15})
    with pytest.raises(UserError, match="exceeds"):
        config.preset("default", {"attack.name": "adaptive_blend", "attack.adaptive_blend.kept": 20})
    a = _attack("adaptive_blend", pieces=9, kept=3)
    with pytest.raises(UserError, match="does not divide"):
        a.check((28, 28, 1))


# -- BppAttack --------------------------------------------------------------------------------------
def test_bpp_squeezes_to_levels():
    x = np.array([0.0, 0.1, 0.2, 0.5, 0.93, 1.0], np.float32).reshape(1, 1, 6, 1)
    out = _attack("bpp", levels=3).stamp(x, None, test=False)
    assert np.allclose(out.ravel(), [0, 0, 0, 0.5, 1, 1])  # x * 2 = 0, .2, .4, 1, 1.86, 2, rounded, halved


def test_floyd_steinberg_diffuses_the_error():
    x = np.full((1, 4, 4, 1), 0.25, np.float32)
    out = bpp.floyd_steinberg(x, 2)
    assert set(np.unique(out)) <= {0.0, 1.0}
    assert abs(out.mean() - 0.25) <= 1 / 16 + 1e-9  # the mean grey survives as a dot pattern
    assert np.isclose(bpp.floyd_steinberg(np.zeros((1, 3, 3, 1), np.float32), 8), 0).all()


# -- smooth -----------------------------------------------------------------------------------------
def test_smooth_pattern_is_low_frequency_and_bounded():
    a = _attack("smooth", amplitude=0.1, grid=3)
    p = smooth.pattern(a.s, (28, 28, 1))
    assert np.isclose(np.abs(p).max(), 0.1)
    assert np.abs(np.diff(p, axis=0)).max() < 0.1 / 5 and np.abs(np.diff(p, axis=1)).max() < 0.1 / 5


# -- bad settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path,value,match", [
    ("attack.cross.amplitude", 0.0, "must be > 0"),
    ("attack.sig.delta", 2.0, "must be > 0.0 and <= 1.0"),
    ("attack.wanet.k", 1, "must be from 2"),
    ("attack.bpp.levels", 1, "must be from 2"),
    ("attack.smooth.grid", 0, "must be from 2"),
    ("attack.name", "wannet", "did you mean 'wanet'"),
])
def test_bad_settings_are_one_user_error(path, value, match):
    with pytest.raises(UserError, match=match):
        config.preset("default", {path: value})


def test_too_many_covers_is_a_user_error_before_any_work():
    x, y = _data(n=100)
    with pytest.raises(UserError, match="cover images do not fit"):
        attacks.poison_training_set(_attack("wanet", n_poison=10, cover_ratio=50.0), x, y, N_CLASSES)
    # 85 covers fit beside 10 poisons in 100 images, but not in the 80 outside the target class
    # and the poisons: covers never come from the target class.
    with pytest.raises(UserError, match="85 cover images do not fit .* the 80 training images left outside"):
        attacks.poison_training_set(_attack("wanet", n_poison=10, cover_ratio=8.5), x, y, N_CLASSES)


def test_clean_label_poison_count_is_checked_against_the_target_class():
    x, y = _data(n=100)
    with pytest.raises(UserError, match="class 2 has only 10"):
        attacks.poison_training_set(_attack("sig", n_poison=11), x, y, N_CLASSES)


def test_patch_larger_than_the_image_says_so():
    with pytest.raises(UserError, match="larger than the 28x28 image"):
        _attack("patch", size=29, row=0, col=0).check((28, 28, 1))


def test_wanet_needs_square_images():
    with pytest.raises(UserError, match="square"):
        _attack("wanet").check((28, 32, 1))
    assert math.isclose(_attack("wanet").s.s, 0.5)
