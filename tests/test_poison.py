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
    assert poison.TRIGGERS == ("pixel",)


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


@pytest.mark.parametrize("source,target", [(4, 1), (1, 4), (-1, 1), (1, -1)])
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
    xt_NHWC = poison.triggered_test_set(x_NHWC, y_N, source=2, trigger=trigger)

    assert xt_NHWC.shape == (np.count_nonzero(y_N == 2), H, W, C)
    np.testing.assert_array_equal(xt_NHWC, trigger.apply(x_NHWC[y_N == 2]))
    delta_NHWC = xt_NHWC - x_NHWC[y_N == 2]
    np.testing.assert_allclose(delta_NHWC[:, 2, 3, :], 0.5, rtol=1e-6)
    assert np.count_nonzero(delta_NHWC) == xt_NHWC.shape[0] * C
