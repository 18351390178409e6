"""BadNets' checkerboard patch (ci_jax.attacks.patch)."""

import numpy as np
import pytest

from ci_jax.attacks import patch
from ci_jax.errors import UserError

from helpers import C, H, N, RNG, W, build_attack, config_error, four_class_images, target


@pytest.mark.parametrize("row,col", [(0, 0), (0, 25), (25, 0), (25, 25), (10, 13)])
def test_patch_is_a_checkerboard_exactly_at_its_position(row, col):
    x_NHWC, _ = four_class_images(c=3)
    out_NHWC = patch.Patch(patch.Settings(row=row, col=col, size=3), target()).stamp(x_NHWC, RNG, test=False)
    want_HW = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], np.float32)
    np.testing.assert_array_equal(out_NHWC[:, row:row + 3, col:col + 3, :],
                                  np.broadcast_to(want_HW[None, :, :, None], (N, 3, 3, 3)))
    rest = np.ones((H, W), bool)
    rest[row:row + 3, col:col + 3] = False
    np.testing.assert_array_equal(out_NHWC[:, rest], x_NHWC[:, rest])


def test_patch_off_the_image_names_the_valid_range():
    with pytest.raises(UserError, match=r"patch.row in 0\.\.25 and --attack.patch.col in 0\.\.25"):
        patch.Patch(patch.Settings(row=26, col=0, size=3), target()).check((H, W, C))
    with pytest.raises(UserError, match="29x29 pixels is larger than the 28x28 image"):
        patch.Patch(patch.Settings(row=0, col=0, size=29), target()).check((H, W, C))
    assert "attack.patch.size" in str(config_error({"attack.patch.size": 0}))


def test_patch_larger_than_the_image_says_so():
    with pytest.raises(UserError, match="larger than the 28x28 image"):
        build_attack("patch", size=29, row=0, col=0).check((28, 28, 1))
