"""What every attack shares (ci_jax.attacks.base, and the registry in ci_jax.attacks): which images
are poisoned and how they are booked, covers, clean-label poisons, the triggered test set, the
checks before any work, and every plug-in's bookkeeping, determinism and bounds."""

import numpy as np
import pytest

from ci_jax import attacks, config
from ci_jax.attacks import blend, none, patch, pixel
from ci_jax.attacks.base import Attack
from ci_jax.config import Config
from ci_jax.errors import UserError

from helpers import (C, H, RNG, W, build_attack, config_error, four_class_images, pixel_attack, target,
                     ten_class_images)

N_CLASSES = 10  # of ten_class_images


# --- the registry: every plug-in -------------------------------------------------------------------


def test_every_attack_is_registered_and_has_a_config_section():
    assert set(attacks.NAMES) == {"none", "pixel", "patch", "blend", "chessboard", "static", "cross", "fourpixel",
                                  "sig", "wanet", "adaptive_blend", "bpp", "smooth"}
    for name, cls in attacks.REGISTRY.items():
        assert cls.__doc__ or cls.__module__, name
        if cls.Settings is not None:
            assert hasattr(config.Config().attack, name)


@pytest.mark.parametrize("name", [n for n in attacks.NAMES if n != "none"])
def test_bookkeeping_determinism_and_bounds(name):
    x, y = ten_class_images()
    a = build_attack(name)
    p = attacks.poison_training_set(a, x, y, N_CLASSES)
    again = attacks.poison_training_set(build_attack(name), x, y, N_CLASSES)
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
    x, y = ten_class_images()
    pick = lambda seed: attacks.poison_training_set(build_attack("patch", selection="random", seed=seed), x, y,
                                                    N_CLASSES).poison_idx
    assert np.array_equal(pick(1), pick(1)) and not np.array_equal(pick(1), pick(2))


def test_asr_set_is_the_source_or_every_non_target_class():
    x, y = ten_class_images()
    assert set(y[attacks.triggered_test_set(build_attack("patch"), x, y, N_CLASSES).idx]) == {0}
    all_to_one = attacks.triggered_test_set(build_attack("patch", source=-1), x, y, N_CLASSES)
    assert set(y[all_to_one.idx]) == set(range(N_CLASSES)) - {2}
    clean_label = attacks.triggered_test_set(build_attack("sig"), x, y, N_CLASSES)
    assert set(y[clean_label.idx]) == set(range(N_CLASSES)) - {2}
    assert "not of the target class 2" in clean_label.description
    none = attacks.triggered_test_set(build_attack("none"), x, y, N_CLASSES)
    assert len(none.idx) == 0


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
        attacks.build("sticker", None, target())


# -- bad settings -----------------------------------------------------------------------------------
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


# --- poisoning -------------------------------------------------------------------------------
def _poison(attack: Attack | None = None, **where) -> tuple[np.ndarray, np.ndarray, attacks.PoisonedSet]:
    x_NHWC, y_N = four_class_images()
    attack = attack or pixel_attack(target(**where))
    return x_NHWC, y_N, attacks.poison_training_set(attack, x_NHWC, y_N, 4)


def test_poison_bookkeeping():
    x_NHWC, y_N, ps = _poison()
    trigger = pixel_attack()

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
    x_NHWC, y_N = four_class_images()
    x_before, y_before = x_NHWC.copy(), y_N.copy()
    ps = attacks.poison_training_set(pixel_attack(), x_NHWC, y_N, 4)
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
    assert "-1" in str(config_error({"attack.n_poison": -1}))


def test_source_equal_to_target_rejected():
    assert "attack.source and attack.target" in str(config_error({"attack.source": 2, "attack.target": 2}))


@pytest.mark.parametrize("source,target", [(4, 1), (1, 4), (-2, 1), (1, -1)])
def test_class_out_of_range_rejected(source, target):
    with pytest.raises(UserError, match=r"0\.\.3"):
        _poison(source=source, target=target)


def test_unknown_selection_rejected():
    assert "'best'" in str(config_error({"attack.selection": "best"}))
    assert "first, random" in str(config_error({"attack.selection": "best"}))


def test_bad_trigger_rejected_before_poisoning():
    with pytest.raises(UserError, match="28x28"):
        _poison(pixel_attack(row=28))


def test_poisoning_and_the_test_set_validate_against_the_image():
    x_NHWC = np.zeros((8, 16, 16, 1), np.float32)
    y_N = np.arange(8, dtype=np.int32) % 4
    with pytest.raises(UserError, match="16x16"):  # the default (18, 24) does not fit
        attacks.poison_training_set(pixel_attack(target(n=1)), x_NHWC, y_N, 4)
    with pytest.raises(UserError, match="16x16"):
        attacks.triggered_test_set(pixel_attack(), x_NHWC, y_N, 4)


def test_clean_label_poison_count_is_checked_against_the_target_class():
    x, y = ten_class_images(n=100)
    with pytest.raises(UserError, match="class 2 has only 10"):
        attacks.poison_training_set(build_attack("sig", n_poison=11), x, y, N_CLASSES)


# --- test set --------------------------------------------------------------------------------
def test_triggered_test_set_holds_every_source_image_with_trigger():
    x_NHWC, y_N = four_class_images(seed=1)
    attack = pixel_attack(target(source=2), row=2, col=3, amplitude=0.5)
    trig = attacks.triggered_test_set(attack, x_NHWC, y_N, 4)
    np.testing.assert_array_equal(trig.idx, np.flatnonzero(y_N == 2))
    assert trig.description == "test images of class 2, triggered"

    xt_NHWC = trig.x_NHWC
    assert xt_NHWC.shape == (np.count_nonzero(y_N == 2), H, W, C)
    np.testing.assert_array_equal(xt_NHWC, attack.stamp(x_NHWC[y_N == 2], RNG, test=True))
    delta_NHWC = xt_NHWC - x_NHWC[y_N == 2]
    np.testing.assert_allclose(delta_NHWC[:, 2, 3, :], 0.5, rtol=1e-6)
    assert np.count_nonzero(delta_NHWC) == xt_NHWC.shape[0] * C


def test_all_to_one_poisons_every_class_but_the_target():
    x_NHWC, y_N = four_class_images()
    corner = lambda n: patch.Patch(patch.Settings(row=0, col=0), target(source=-1, target=3, n=n))
    ps = attacks.poison_training_set(corner(30), x_NHWC, y_N, 4)
    assert set(y_N[ps.poison_idx]) == {0, 1, 2}
    assert np.all(ps.y_N[ps.poison_idx] == 3)
    with pytest.raises(UserError, match="only 30 training images"):
        attacks.poison_training_set(corner(31), x_NHWC, y_N, 4)
    trig = attacks.triggered_test_set(corner(30), x_NHWC, y_N, 4)
    np.testing.assert_array_equal(trig.idx, np.flatnonzero(y_N != 3))
    assert trig.description == "every test image not of the target class 3, triggered"
    bad = patch.Patch(patch.Settings(row=0, col=0), target(source=-2, target=3, n=1))
    with pytest.raises(UserError, match="attack.source -2"):
        attacks.validate(bad, y_N, 4, (H, W, C))


# --- what the base class does for every attack: clean-label poisons, covers ----------------------
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
    x_NHWC, y_N = four_class_images()
    attack = _CleanLabel(None, target(source=1, target=3, n=5))
    ps = attacks.poison_training_set(attack, x_NHWC, y_N, 4)
    np.testing.assert_array_equal(ps.poison_idx, np.flatnonzero(y_N == 3)[:5])
    np.testing.assert_array_equal(ps.y_N, y_N)  # no label changes
    np.testing.assert_allclose(ps.x_NHWC[ps.poison_idx, 0, 0, 0], x_NHWC[ps.poison_idx, 0, 0, 0] + 0.5)
    with pytest.raises(UserError, match="class 3 has only 10"):
        attacks.poison_training_set(_CleanLabel(None, target(target=3, n=11)), x_NHWC, y_N, 4)
    # At test time the trigger is meant for every other class.
    trig = attacks.triggered_test_set(attack, x_NHWC, y_N, 4)
    np.testing.assert_array_equal(trig.idx, np.flatnonzero(y_N != 3))


def test_covers_keep_their_labels_and_leave_the_poisons_as_they_were():
    x_NHWC, y_N = four_class_images()
    t = target(n=6, selection="random", seed=2)
    plain = attacks.poison_training_set(pixel_attack(t), x_NHWC, y_N, 4)
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
    x_NHWC, y_N = four_class_images()

    class TooMany(_WithCovers):
        def n_covers(self, n_poison):
            return len(y_N)

    with pytest.raises(UserError, match="cover images do not fit"):
        attacks.poison_training_set(TooMany(pixel.Settings(), target(n=4)), x_NHWC, y_N, 4)


def test_too_many_covers_is_a_user_error_before_any_work():
    x, y = ten_class_images(n=100)
    with pytest.raises(UserError, match="cover images do not fit"):
        attacks.poison_training_set(build_attack("wanet", n_poison=10, cover_ratio=50.0), x, y, N_CLASSES)
    # 85 covers fit beside 10 poisons in 100 images, but not in the 80 outside the target class
    # and the poisons: covers never come from the target class.
    with pytest.raises(UserError, match="85 cover images do not fit .* the 80 training images left outside"):
        attacks.poison_training_set(build_attack("wanet", n_poison=10, cover_ratio=8.5), x, y, N_CLASSES)


def test_a_trigger_that_makes_nan_is_a_bug_not_a_user_error():
    class Broken(Attack):
        def stamp(self, x_NHWC, rng, test):
            return np.full_like(x_NHWC, np.nan)

    x_NHWC, y_N = four_class_images()
    with pytest.raises(ValueError, match="Broken.stamp") as e:
        attacks.poison_training_set(Broken(None, target()), x_NHWC, y_N, 4)
    assert not isinstance(e.value, UserError)
