import numpy as np
import pytest

from ci_jax import poison
from ci_jax.errors import UserError
from ci_jax.poison import PixelTrigger

N, H, W, C = 40, 28, 28, 1


def _dataset(seed: int = 0, n: int = N, c: int = C) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x_NHWC = rng.uniform(0.0, 0.8, (n, H, W, c)).astype(np.float32)
    y_N = (np.arange(n) % 4).astype(np.int32)  # 10 images per class 0..3
    return x_NHWC, y_N


# --- trigger ---------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_trigger_adds_amplitude_at_one_pixel_of_every_channel(channels):
    x_NHWC, _ = _dataset(c=channels)
    trigger = PixelTrigger(row=5, col=7, amplitude=0.25)
    out_NHWC = trigger.apply(x_NHWC)

    expected_NHWC = x_NHWC.copy()
    expected_NHWC[:, 5, 7, :] += np.float32(0.25)
    assert out_NHWC.dtype == np.float32
    np.testing.assert_array_equal(out_NHWC, expected_NHWC)


def test_trigger_does_not_mutate_input():
    x_NHWC, _ = _dataset()
    before_NHWC = x_NHWC.copy()
    out_NHWC = PixelTrigger().apply(x_NHWC)
    np.testing.assert_array_equal(x_NHWC, before_NHWC)
    assert not np.shares_memory(out_NHWC, x_NHWC)


def test_trigger_does_not_clip_by_default():
    x_NHWC = np.zeros((1, H, W, C), np.float32)
    x_NHWC[0, 18, 24, 0] = 0.9
    out_NHWC = PixelTrigger().apply(x_NHWC)
    assert out_NHWC[0, 18, 24, 0] == pytest.approx(1.15)


def test_trigger_clips_to_one_when_asked():
    x_NHWC = np.zeros((1, H, W, C), np.float32)
    x_NHWC[0, 18, 24, 0] = 0.9
    out_NHWC = PixelTrigger(clip=True).apply(x_NHWC)
    assert out_NHWC[0, 18, 24, 0] == 1.0
    assert np.count_nonzero(out_NHWC) == 1


def test_default_trigger_is_the_seed_attack():
    assert PixelTrigger() == PixelTrigger(row=18, col=24, amplitude=0.25, clip=False)
    assert poison.TRIGGERS[0] == "pixel"


def test_off_image_trigger_names_position_and_image_size():
    with pytest.raises(UserError, match=r"\(30, 24\).*28x28.*0\.\.27"):
        PixelTrigger(row=30, col=24).validate((28, 28, 1))
    with pytest.raises(UserError, match=r"\(3, 32\).*32x32"):
        PixelTrigger(row=3, col=32).validate((32, 32, 3))


def test_negative_trigger_row_rejected():
    with pytest.raises(UserError, match=r"\(-1, 24\)"):
        PixelTrigger(row=-1).validate((28, 28, 1))


@pytest.mark.parametrize("amplitude", [0.0, -0.25, float("nan"), float("inf")])
def test_bad_amplitude_rejected(amplitude):
    with pytest.raises(UserError, match="amplitude"):
        PixelTrigger(amplitude=amplitude).validate((28, 28, 1))


def test_apply_validates_against_the_image():
    x_NHWC = np.zeros((2, 16, 16, 1), np.float32)
    with pytest.raises(UserError, match="16x16"):
        PixelTrigger().apply(x_NHWC)  # default (18, 24) does not fit


# --- poisoning -------------------------------------------------------------------------------


def _poison(**kwargs) -> tuple[np.ndarray, np.ndarray, poison.PoisonedSet]:
    x_NHWC, y_N = _dataset()
    args = dict(source=1, target=3, n=4, trigger=PixelTrigger(), num_classes=4)
    args.update(kwargs)
    return x_NHWC, y_N, poison.poison_training_set(x_NHWC, y_N, **args)


def test_poison_bookkeeping():
    x_NHWC, y_N, ps = _poison()
    trigger = PixelTrigger()

    assert ps.poison_idx.dtype == np.int64
    assert ps.poison_idx.size == 4
    assert np.all(np.diff(ps.poison_idx) > 0)
    assert np.all(y_N[ps.poison_idx] == 1)
    assert ps.y_N.dtype == np.int32 and ps.x_NHWC.dtype == np.float32
    assert np.all(ps.y_N[ps.poison_idx] == 3)
    assert ps.is_poison_N.dtype == bool
    np.testing.assert_array_equal(np.flatnonzero(ps.is_poison_N), ps.poison_idx)
    np.testing.assert_array_equal(ps.x_NHWC[ps.poison_idx], trigger.apply(x_NHWC[ps.poison_idx]))

    clean_N = ~ps.is_poison_N
    assert ps.x_NHWC[clean_N].tobytes() == x_NHWC[clean_N].tobytes()
    np.testing.assert_array_equal(ps.y_N[clean_N], y_N[clean_N])


def test_poisoning_does_not_mutate_inputs():
    x_NHWC, y_N = _dataset()
    x_before, y_before = x_NHWC.copy(), y_N.copy()
    ps = poison.poison_training_set(
        x_NHWC, y_N, source=1, target=3, n=4, trigger=PixelTrigger(), num_classes=4
    )
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
    with pytest.raises(UserError, match="asked for 11 poisons but class 1 has only 10 images"):
        _poison(n=11)


def test_negative_poison_count_rejected():
    with pytest.raises(UserError, match="-1"):
        _poison(n=-1)


def test_source_equal_to_target_rejected():
    with pytest.raises(UserError, match="source and target"):
        _poison(source=2, target=2)


@pytest.mark.parametrize("source,target", [(4, 1), (1, 4), (-2, 1), (1, -1)])
def test_class_out_of_range_rejected(source, target):
    with pytest.raises(UserError, match=r"0\.\.3"):
        _poison(source=source, target=target)


def test_unknown_selection_rejected():
    with pytest.raises(UserError, match="'best'.*first, random"):
        _poison(selection="best")


def test_bad_trigger_rejected_before_poisoning():
    with pytest.raises(UserError, match="28x28"):
        _poison(trigger=PixelTrigger(row=28))


# --- test set --------------------------------------------------------------------------------


def test_triggered_test_set_holds_every_source_image_with_trigger():
    x_NHWC, y_N = _dataset(seed=1)
    trigger = PixelTrigger(row=2, col=3, amplitude=0.5)
    xt_NHWC, idx = poison.triggered_test_set(x_NHWC, y_N, source=2, trigger=trigger)
    np.testing.assert_array_equal(idx, np.flatnonzero(y_N == 2))

    assert xt_NHWC.shape == (np.count_nonzero(y_N == 2), H, W, C)
    np.testing.assert_array_equal(xt_NHWC, trigger.apply(x_NHWC[y_N == 2]))
    delta_NHWC = xt_NHWC - x_NHWC[y_N == 2]
    np.testing.assert_allclose(delta_NHWC[:, 2, 3, :], 0.5, rtol=1e-6)
    assert np.count_nonzero(delta_NHWC) == xt_NHWC.shape[0] * C


# --- the other triggers ------------------------------------------------------------------------


def _changed(before_NHWC: np.ndarray, after_NHWC: np.ndarray) -> np.ndarray:
    return np.argwhere(np.any(before_NHWC != after_NHWC, axis=(0, 3)))


@pytest.mark.parametrize("row,col", [(0, 0), (0, 25), (25, 0), (25, 25), (10, 13)])
def test_patch_is_a_checkerboard_exactly_at_its_position(row, col):
    x_NHWC, _ = _dataset(c=3)
    out_NHWC = poison.PatchTrigger(row=row, col=col, size=3).apply(x_NHWC)
    want_HW = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], np.float32)
    np.testing.assert_array_equal(out_NHWC[:, row:row + 3, col:col + 3, :],
                                  np.broadcast_to(want_HW[None, :, :, None], (N, 3, 3, 3)))
    rest = np.ones((H, W), bool)
    rest[row:row + 3, col:col + 3] = False
    np.testing.assert_array_equal(out_NHWC[:, rest], x_NHWC[:, rest])


def test_patch_off_the_image_names_the_valid_range():
    with pytest.raises(UserError, match=r"row in 0\.\.25 and col in 0\.\.25"):
        poison.PatchTrigger(row=26, col=0, size=3).validate((H, W, C))
    with pytest.raises(UserError, match="size"):
        poison.PatchTrigger(size=0).validate((H, W, C))


def test_blend_mixes_a_fixed_seeded_pattern_everywhere():
    x_NHWC, _ = _dataset()
    trig = poison.BlendTrigger(alpha=0.2, seed=3)
    out_NHWC = trig.apply(x_NHWC)
    pattern_HWC = np.random.default_rng(3).uniform(0, 1, (H, W, C)).astype(np.float32)
    np.testing.assert_allclose(out_NHWC, 0.8 * x_NHWC + 0.2 * pattern_HWC[None], rtol=1e-6)
    np.testing.assert_array_equal(out_NHWC, poison.BlendTrigger(alpha=0.2, seed=3).apply(x_NHWC))
    assert not np.array_equal(out_NHWC, poison.BlendTrigger(alpha=0.2, seed=4).apply(x_NHWC))
    assert out_NHWC.min() >= 0 and out_NHWC.max() <= 1
    with pytest.raises(UserError, match="alpha"):
        poison.BlendTrigger(alpha=1.5).validate((H, W, C))


def test_chessboard_adds_plus_minus_delta_on_alternating_pixels():
    x_NHWC, _ = _dataset(c=3)
    x_NHWC = np.clip(x_NHWC, 0.2, 0.7)  # away from the edges: no clipping can happen
    out_NHWC = poison.ChessboardTrigger(delta=0.05).apply(x_NHWC)
    i, j = np.indices((H, W))
    sign_HW = np.where((i + j) % 2 == 0, 1.0, -1.0)
    np.testing.assert_allclose(out_NHWC - x_NHWC, np.broadcast_to(0.05 * sign_HW[None, :, :, None], x_NHWC.shape),
                               atol=1e-6)
    zeros_NHWC = np.zeros((2, H, W, 1), np.float32)
    clipped_NHWC = poison.ChessboardTrigger(delta=0.05, clip=True).apply(zeros_NHWC)
    np.testing.assert_allclose(clipped_NHWC[0, :, :, 0], np.where(sign_HW > 0, 0.05, 0.0), atol=1e-7)


def test_make_trigger_builds_each_kind_from_the_config():
    from ci_jax import config

    assert poison.make_trigger(config.Config()) == poison.PixelTrigger(18, 24, 0.25, False)
    cfg = config.Config(trigger="patch", trigger_row=1, trigger_col=2, patch_size=4)
    assert poison.make_trigger(cfg) == poison.PatchTrigger(1, 2, 4)
    assert poison.make_trigger(config.Config(trigger="blend", blend_alpha=0.3, trigger_seed=7)) == \
        poison.BlendTrigger(0.3, 7)
    assert poison.make_trigger(config.Config(trigger="chessboard", chess_delta=0.02, clip=True)) == \
        poison.ChessboardTrigger(0.02, True)


def test_all_to_one_poisons_every_class_but_the_target():
    x_NHWC, y_N = _dataset()
    ps = poison.poison_training_set(x_NHWC, y_N, source=-1, target=3, n=30,
                                    trigger=poison.PatchTrigger(0, 0), num_classes=4)
    assert set(y_N[ps.poison_idx]) == {0, 1, 2}
    assert np.all(ps.y_N[ps.poison_idx] == 3)
    with pytest.raises(UserError, match="only 30 images"):
        poison.poison_training_set(x_NHWC, y_N, source=-1, target=3, n=31,
                                   trigger=poison.PatchTrigger(0, 0), num_classes=4)
    xt_NHWC, idx = poison.triggered_test_set(x_NHWC, y_N, source=-1, target=3,
                                             trigger=poison.PatchTrigger(0, 0), num_classes=4)
    np.testing.assert_array_equal(idx, np.flatnonzero(y_N != 3))
    with pytest.raises(UserError, match="source class -2"):
        poison.validate_attack(y_N, 4, (H, W, C), source=-2, target=3, n=1, trigger=poison.PatchTrigger(0, 0))
