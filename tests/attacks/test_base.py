"""The poisoning machinery and the seed's pixel, BadNets patch and blend attacks (ported from the
old test_poison)."""

import numpy as np
import pytest

from ci_jax import attacks, config
from ci_jax.attacks import blend, none, patch, pixel
from ci_jax.attacks.base import Attack
from ci_jax.config import Config
from ci_jax.errors import UserError

N, H, W, C = 40, 28, 28, 1
RNG = np.random.default_rng(0)  # the pixel, patch and blend triggers draw nothing


def _dataset(seed: int = 0, n: int = N, c: int = C) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x_NHWC = rng.uniform(0.0, 0.8, (n, H, W, c)).astype(np.float32)
    y_N = (np.arange(n) % 4).astype(np.int32)  # 10 images per class 0..3
    return x_NHWC, y_N


def _target(source=1, target=3, n=4, selection="first", seed=0) -> attacks.Target:
    return attacks.Target(source, target, n, selection, seed)


def _pixel(target: attacks.Target | None = None, **settings) -> pixel.Pixel:
    return pixel.Pixel(pixel.Settings(**settings), target or _target())


def _config_error(overrides: dict) -> UserError:
    with pytest.raises(UserError) as e:
        config.replace(Config(), overrides)
    return e.value


# --- the pixel trigger -------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_trigger_adds_amplitude_at_one_pixel_of_every_channel(channels):
    x_NHWC, _ = _dataset(c=channels)
    out_NHWC = _pixel(row=5, col=7, amplitude=0.25).stamp(x_NHWC, RNG, test=False)

    expected_NHWC = x_NHWC.copy()
    expected_NHWC[:, 5, 7, :] += np.float32(0.25)
    assert out_NHWC.dtype == np.float32
    np.testing.assert_array_equal(out_NHWC, expected_NHWC)


def test_trigger_does_not_mutate_input():
    x_NHWC, _ = _dataset()
    before_NHWC = x_NHWC.copy()
    out_NHWC = _pixel().stamp(x_NHWC, RNG, test=False)
    np.testing.assert_array_equal(x_NHWC, before_NHWC)
    assert not np.shares_memory(out_NHWC, x_NHWC)


def test_trigger_does_not_clip_by_default():
    x_NHWC = np.zeros((1, H, W, C), np.float32)
    x_NHWC[0, 18, 24, 0] = 0.9
    out_NHWC = _pixel().stamp(x_NHWC, RNG, test=False)
    assert out_NHWC[0, 18, 24, 0] == pytest.approx(1.15)


def test_trigger_clips_to_one_when_asked():
    x_NHWC = np.zeros((1, H, W, C), np.float32)
    x_NHWC[0, 18, 24, 0] = 0.9
    out_NHWC = _pixel(clip=True).stamp(x_NHWC, RNG, test=False)
    assert out_NHWC[0, 18, 24, 0] == 1.0
    assert np.count_nonzero(out_NHWC) == 1


def test_default_trigger_is_the_seed_attack():
    assert pixel.Settings() == pixel.Settings(row=18, col=24, amplitude=0.25, clip=False)
    cfg = Config()
    assert cfg.attack.name == "pixel" and cfg.attack_settings() == pixel.Settings()


def test_off_image_trigger_names_position_and_image_size():
    with pytest.raises(UserError, match=r"\(30, 24\).*28x28.*0\.\.27"):
        _pixel(row=30, col=24).check((28, 28, 1))
    with pytest.raises(UserError, match=r"\(3, 32\).*32x32"):
        _pixel(row=3, col=32).check((32, 32, 3))


def test_negative_trigger_row_rejected():
    with pytest.raises(UserError, match=r"\(-1, 24\)"):
        _pixel(row=-1).check((28, 28, 1))
    assert "attack.pixel.row" in str(_config_error({"attack.pixel.row": -1}))


@pytest.mark.parametrize("amplitude", [0.0, -0.25, float("nan"), float("inf")])
def test_bad_amplitude_rejected(amplitude):
    assert "attack.pixel.amplitude" in str(_config_error({"attack.pixel.amplitude": amplitude}))


def test_poisoning_and_the_test_set_validate_against_the_image():
    x_NHWC = np.zeros((8, 16, 16, 1), np.float32)
    y_N = np.arange(8, dtype=np.int32) % 4
    with pytest.raises(UserError, match="16x16"):  # the default (18, 24) does not fit
        attacks.poison_training_set(_pixel(_target(n=1)), x_NHWC, y_N, 4)
    with pytest.raises(UserError, match="16x16"):
        attacks.triggered_test_set(_pixel(), x_NHWC, y_N, 4)


# --- poisoning -------------------------------------------------------------------------------


def _poison(attack: Attack | None = None, **target) -> tuple[np.ndarray, np.ndarray, attacks.PoisonedSet]:
    x_NHWC, y_N = _dataset()
    attack = attack or _pixel(_target(**target))
    return x_NHWC, y_N, attacks.poison_training_set(attack, x_NHWC, y_N, 4)


def test_poison_bookkeeping():
    x_NHWC, y_N, ps = _poison()
    trigger = _pixel()

    assert ps.poison_idx.dtype == np.int64
    assert ps.poison_idx.size == ps.n_poison == 4
    assert np.all(np.diff(ps.poison_idx) > 0)
    assert np.all(y_N[ps.poison_idx] == 1)
    assert ps.y_N.dtype == np.int32 and ps.x_NHWC.dtype == np.float32
    assert np.all(ps.y_N[ps.poison_idx] == 3)
    assert ps.is_poison_N.dtype == bool and ps.is_cover_N.dtype == bool
    assert not ps.is_cover_N.any() and ps.n_cover == 0  # the pixel attack adds no covers
    np.testing.assert_array_equal(np.flatnonzero(ps.is_poison_N), ps.poison_idx)
    np.testing.assert_array_equal(ps.x_NHWC[ps.poison_idx], trigger.stamp(x_NHWC[ps.poison_idx], RNG, test=False))

    clean_N = ~ps.is_poison_N
    assert ps.x_NHWC[clean_N].tobytes() == x_NHWC[clean_N].tobytes()
    np.testing.assert_array_equal(ps.y_N[clean_N], y_N[clean_N])


def test_poisoning_does_not_mutate_inputs():
    x_NHWC, y_N = _dataset()
    x_before, y_before = x_NHWC.copy(), y_N.copy()
    ps = attacks.poison_training_set(_pixel(), x_NHWC, y_N, 4)
    np.testing.assert_array_equal(x_NHWC, x_before)
    np.testing.assert_array_equal(y_N, y_before)
    assert not np.shares_memory(ps.x_NHWC, x_NHWC)
    assert not np.shares_memory(ps.y_N, y_N)


def test_first_selection_takes_first_n_of_source_class():
    _, y_N, ps = _poison(selection="first")
    np.testing.assert_array_equal(ps.poison_idx, np.flatnonzero(y_N == 1)[:4])


def test_random_selection_is_deterministic_per_seed_and_varies_across_seeds():
    _, y_N, a = _poison(selection="random", seed=0)
    _, _, b = _poison(selection="random", seed=0)
    _, _, c = _poison(selection="random", seed=1)
    np.testing.assert_array_equal(a.poison_idx, b.poison_idx)
    np.testing.assert_array_equal(a.x_NHWC, b.x_NHWC)
    assert not np.array_equal(a.poison_idx, c.poison_idx)
    assert np.all(y_N[a.poison_idx] == 1)
    assert np.unique(a.poison_idx).size == 4


def test_zero_poisons_gives_clean_set():
    x_NHWC, y_N, ps = _poison(n=0)
    assert ps.poison_idx.size == 0 and ps.poison_idx.dtype == np.int64
    assert not ps.is_poison_N.any()
    np.testing.assert_array_equal(ps.x_NHWC, x_NHWC)
    np.testing.assert_array_equal(ps.y_N, y_N)


def test_whole_source_class_can_be_poisoned():
    _, y_N, ps = _poison(n=10)
    np.testing.assert_array_equal(ps.poison_idx, np.flatnonzero(y_N == 1))


def test_too_many_poisons_rejected():
    with pytest.raises(UserError, match="asked for 11 poisons but class 1 has only 10 training images"):
        _poison(n=11)


def test_negative_poison_count_rejected():
    assert "-1" in str(_config_error({"attack.n_poison": -1}))


def test_source_equal_to_target_rejected():
    assert "attack.source and attack.target" in str(_config_error({"attack.source": 2, "attack.target": 2}))


@pytest.mark.parametrize("source,target", [(4, 1), (1, 4), (-2, 1), (1, -1)])
def test_class_out_of_range_rejected(source, target):
    with pytest.raises(UserError, match=r"0\.\.3"):
        _poison(source=source, target=target)


def test_unknown_selection_rejected():
    assert "'best'" in str(_config_error({"attack.selection": "best"}))
    assert "first, random" in str(_config_error({"attack.selection": "best"}))


def test_bad_trigger_rejected_before_poisoning():
    with pytest.raises(UserError, match="28x28"):
        _poison(_pixel(row=28))


# --- test set --------------------------------------------------------------------------------


def test_triggered_test_set_holds_every_source_image_with_trigger():
    x_NHWC, y_N = _dataset(seed=1)
    attack = _pixel(_target(source=2), row=2, col=3, amplitude=0.5)
    trig = attacks.triggered_test_set(attack, x_NHWC, y_N, 4)
    np.testing.assert_array_equal(trig.idx, np.flatnonzero(y_N == 2))
    assert trig.description == "test images of class 2, triggered"

    xt_NHWC = trig.x_NHWC
    assert xt_NHWC.shape == (np.count_nonzero(y_N == 2), H, W, C)
    np.testing.assert_array_equal(xt_NHWC, attack.stamp(x_NHWC[y_N == 2], RNG, test=True))
    delta_NHWC = xt_NHWC - x_NHWC[y_N == 2]
    np.testing.assert_allclose(delta_NHWC[:, 2, 3, :], 0.5, rtol=1e-6)
    assert np.count_nonzero(delta_NHWC) == xt_NHWC.shape[0] * C


# --- the other triggers ------------------------------------------------------------------------


@pytest.mark.parametrize("row,col", [(0, 0), (0, 25), (25, 0), (25, 25), (10, 13)])
def test_patch_is_a_checkerboard_exactly_at_its_position(row, col):
    x_NHWC, _ = _dataset(c=3)
    out_NHWC = patch.Patch(patch.Settings(row=row, col=col, size=3), _target()).stamp(x_NHWC, RNG, test=False)
    want_HW = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], np.float32)
    np.testing.assert_array_equal(out_NHWC[:, row:row + 3, col:col + 3, :],
                                  np.broadcast_to(want_HW[None, :, :, None], (N, 3, 3, 3)))
    rest = np.ones((H, W), bool)
    rest[row:row + 3, col:col + 3] = False
    np.testing.assert_array_equal(out_NHWC[:, rest], x_NHWC[:, rest])


def test_patch_off_the_image_names_the_valid_range():
    with pytest.raises(UserError, match=r"patch.row in 0\.\.25 and --attack.patch.col in 0\.\.25"):
        patch.Patch(patch.Settings(row=26, col=0, size=3), _target()).check((H, W, C))
    with pytest.raises(UserError, match="29x29 pixels is larger than the 28x28 image"):
        patch.Patch(patch.Settings(row=0, col=0, size=29), _target()).check((H, W, C))
    assert "attack.patch.size" in str(_config_error({"attack.patch.size": 0}))


def test_blend_mixes_a_fixed_seeded_pattern_everywhere():
    x_NHWC, _ = _dataset()
    make = lambda alpha, seed: blend.Blend(blend.Settings(alpha=alpha, pattern_seed=seed), _target())
    out_NHWC = make(0.2, 3).stamp(x_NHWC, RNG, test=False)
    pattern_HWC = np.random.default_rng(3).uniform(0, 1, (H, W, C)).astype(np.float32)
    np.testing.assert_allclose(out_NHWC, 0.8 * x_NHWC + 0.2 * pattern_HWC[None], rtol=1e-6)
    np.testing.assert_array_equal(out_NHWC, make(0.2, 3).stamp(x_NHWC, np.random.default_rng(9), test=True))
    assert not np.array_equal(out_NHWC, make(0.2, 4).stamp(x_NHWC, RNG, test=False))
    assert out_NHWC.min() >= 0 and out_NHWC.max() <= 1
    assert "attack.blend.alpha" in str(_config_error({"attack.blend.alpha": 1.5}))


def test_build_makes_each_attack_from_the_config():
    def built(overrides):
        cfg = config.replace(Config(), overrides)
        a = cfg.attack
        return attacks.build(a.name, cfg.attack_settings(), attacks.Target(a.source, a.target, a.n_poison,
                                                                           a.selection, cfg.seed))

    px = built({})
    assert type(px) is pixel.Pixel and px.s == pixel.Settings(18, 24, 0.25, False)
    assert px.t == attacks.Target(0, 2, 1000, "first", 0)
    pt = built({"attack.name": "patch", "attack.patch.row": 1, "attack.patch.col": 2, "attack.patch.size": 4})
    assert type(pt) is patch.Patch and pt.s == patch.Settings(1, 2, 4)
    bl = built({"attack.name": "blend", "attack.blend.alpha": 0.3, "attack.blend.pattern_seed": 7, "seed": 5})
    assert type(bl) is blend.Blend and bl.s == blend.Settings(0.3, 7) and bl.t.seed == 5
    assert type(built({"attack.name": "none"})) is none.NoAttack
    with pytest.raises(UserError, match="unknown attack 'sticker'"):
        attacks.build("sticker", None, _target())


def test_all_to_one_poisons_every_class_but_the_target():
    x_NHWC, y_N = _dataset()
    corner = lambda n: patch.Patch(patch.Settings(row=0, col=0), _target(source=-1, target=3, n=n))
    ps = attacks.poison_training_set(corner(30), x_NHWC, y_N, 4)
    assert set(y_N[ps.poison_idx]) == {0, 1, 2}
    assert np.all(ps.y_N[ps.poison_idx] == 3)
    with pytest.raises(UserError, match="only 30 training images"):
        attacks.poison_training_set(corner(31), x_NHWC, y_N, 4)
    trig = attacks.triggered_test_set(corner(30), x_NHWC, y_N, 4)
    np.testing.assert_array_equal(trig.idx, np.flatnonzero(y_N != 3))
    assert trig.description == "every test image not of the target class 3, triggered"
    bad = patch.Patch(patch.Settings(row=0, col=0), _target(source=-2, target=3, n=1))
    with pytest.raises(UserError, match="attack.source -2"):
        attacks.validate(bad, y_N, 4, (H, W, C))


# --- what the base class does for every attack: clean-label poisons, covers, no attack ----------


class _CleanLabel(Attack):
    """Poisons drawn from the target class, keeping their label; +0.5 at (0, 0)."""

    clean_label = True

    def stamp(self, x_NHWC, rng, test):
        out = x_NHWC.copy()
        out[:, 0, 0, :] += 0.5
        return out


class _WithCovers(pixel.Pixel):
    """The pixel attack plus one cover for every two poisons, stamped with a weaker pixel."""

    def n_covers(self, n_poison):
        return n_poison // 2

    def cover(self, x_NHWC, rng):
        out = x_NHWC.copy()
        out[:, self.s.row, self.s.col, :] += 0.1
        return out


def test_a_clean_label_attack_poisons_the_target_class_and_keeps_its_labels():
    x_NHWC, y_N = _dataset()
    attack = _CleanLabel(None, _target(source=1, target=3, n=5))
    ps = attacks.poison_training_set(attack, x_NHWC, y_N, 4)
    np.testing.assert_array_equal(ps.poison_idx, np.flatnonzero(y_N == 3)[:5])
    np.testing.assert_array_equal(ps.y_N, y_N)  # no label changes
    np.testing.assert_allclose(ps.x_NHWC[ps.poison_idx, 0, 0, 0], x_NHWC[ps.poison_idx, 0, 0, 0] + 0.5)
    with pytest.raises(UserError, match="class 3 has only 10"):
        attacks.poison_training_set(_CleanLabel(None, _target(target=3, n=11)), x_NHWC, y_N, 4)
    # At test time the trigger is meant for every other class.
    trig = attacks.triggered_test_set(attack, x_NHWC, y_N, 4)
    np.testing.assert_array_equal(trig.idx, np.flatnonzero(y_N != 3))


def test_covers_keep_their_labels_and_leave_the_poisons_as_they_were():
    x_NHWC, y_N = _dataset()
    t = _target(n=6, selection="random", seed=2)
    plain = attacks.poison_training_set(_pixel(t), x_NHWC, y_N, 4)
    covered = attacks.poison_training_set(_WithCovers(pixel.Settings(), t), x_NHWC, y_N, 4)
    np.testing.assert_array_equal(covered.poison_idx, plain.poison_idx)  # their own random stream
    np.testing.assert_array_equal(covered.x_NHWC[covered.is_poison_N], plain.x_NHWC[plain.is_poison_N])
    assert covered.n_cover == 3 and not (covered.is_cover_N & covered.is_poison_N).any()
    cover_idx = np.flatnonzero(covered.is_cover_N)
    assert not np.isin(y_N[cover_idx], [3]).any()  # drawn from every class but the target
    np.testing.assert_array_equal(covered.y_N[cover_idx], y_N[cover_idx])
    np.testing.assert_allclose(covered.x_NHWC[cover_idx, 18, 24, 0], x_NHWC[cover_idx, 18, 24, 0] + 0.1, rtol=1e-6)
    untouched = ~(covered.is_cover_N | covered.is_poison_N)
    np.testing.assert_array_equal(covered.x_NHWC[untouched], x_NHWC[untouched])


def test_covers_that_do_not_fit_are_refused():
    x_NHWC, y_N = _dataset()

    class TooMany(_WithCovers):
        def n_covers(self, n_poison):
            return len(y_N)

    with pytest.raises(UserError, match="cover images do not fit"):
        attacks.poison_training_set(TooMany(pixel.Settings(), _target(n=4)), x_NHWC, y_N, 4)


def test_no_attack_plants_nothing_and_has_no_triggered_test_set():
    x_NHWC, y_N = _dataset()
    attack = none.NoAttack(None, _target(n=1000))  # n_poison is moot: nothing is planted
    ps = attacks.poison_training_set(attack, x_NHWC, y_N, 4)
    assert ps.n_poison == 0 and ps.n_cover == 0
    np.testing.assert_array_equal(ps.x_NHWC, x_NHWC)
    trig = attacks.triggered_test_set(attack, x_NHWC, y_N, 4)
    assert trig.x_NHWC.shape == (0, H, W, C) and trig.idx.size == 0


def test_a_trigger_that_makes_nan_is_a_bug_not_a_user_error():
    class Broken(Attack):
        def stamp(self, x_NHWC, rng, test):
            return np.full_like(x_NHWC, np.nan)

    x_NHWC, y_N = _dataset()
    with pytest.raises(ValueError, match="Broken.stamp") as e:
        attacks.poison_training_set(Broken(None, _target()), x_NHWC, y_N, 4)
    assert not isinstance(e.value, UserError)
