"""The seed attack's single bright pixel (ci_jax.attacks.pixel)."""

import numpy as np
import pytest

from ci_jax.attacks import pixel
from ci_jax.config import Config
from ci_jax.errors import UserError

from helpers import C, H, RNG, W, config_error, four_class_images, pixel_attack


@pytest.mark.parametrize("channels", [1, 3])
def test_trigger_adds_amplitude_at_one_pixel_of_every_channel(channels):
    x_NHWC, _ = four_class_images(c=channels)
    out_NHWC = pixel_attack(row=5, col=7, amplitude=0.25).stamp(x_NHWC, RNG, test=False)

    expected_NHWC = x_NHWC.copy()
    expected_NHWC[:, 5, 7, :] += np.float32(0.25)
    assert out_NHWC.dtype == np.float32
    np.testing.assert_array_equal(out_NHWC, expected_NHWC)


def test_trigger_does_not_mutate_input():
    x_NHWC, _ = four_class_images()
    before_NHWC = x_NHWC.copy()
    out_NHWC = pixel_attack().stamp(x_NHWC, RNG, test=False)
    np.testing.assert_array_equal(x_NHWC, before_NHWC)
    assert not np.shares_memory(out_NHWC, x_NHWC)


def test_trigger_does_not_clip_by_default():
    x_NHWC = np.zeros((1, H, W, C), np.float32)
    x_NHWC[0, 18, 24, 0] = 0.9
    out_NHWC = pixel_attack().stamp(x_NHWC, RNG, test=False)
    assert out_NHWC[0, 18, 24, 0] == pytest.approx(1.15)


def test_trigger_clips_to_one_when_asked():
    x_NHWC = np.zeros((1, H, W, C), np.float32)
    x_NHWC[0, 18, 24, 0] = 0.9
    out_NHWC = pixel_attack(clip=True).stamp(x_NHWC, RNG, test=False)
    assert out_NHWC[0, 18, 24, 0] == 1.0
    assert np.count_nonzero(out_NHWC) == 1


def test_default_trigger_is_the_seed_attack():
    assert pixel.Settings() == pixel.Settings(row=18, col=24, amplitude=0.25, clip=False)
    cfg = Config()
    assert cfg.attack.name == "pixel" and cfg.attack_settings() == pixel.Settings()


def test_off_image_trigger_names_position_and_image_size():
    with pytest.raises(UserError, match=r"\(30, 24\).*28x28.*0\.\.27"):
        pixel_attack(row=30, col=24).check((28, 28, 1))
    with pytest.raises(UserError, match=r"\(3, 32\).*32x32"):
        pixel_attack(row=3, col=32).check((32, 32, 3))


def test_negative_trigger_row_rejected():
    with pytest.raises(UserError, match=r"\(-1, 24\)"):
        pixel_attack(row=-1).check((28, 28, 1))
    assert "attack.pixel.row" in str(config_error({"attack.pixel.row": -1}))


@pytest.mark.parametrize("amplitude", [0.0, -0.25, float("nan"), float("inf")])
def test_bad_amplitude_rejected(amplitude):
    assert "attack.pixel.amplitude" in str(config_error({"attack.pixel.amplitude": amplitude}))
