"""No attack (ci_jax.attacks.none): the clean training set."""

import numpy as np

from ci_jax import attacks
from ci_jax.attacks import none

from helpers import C, H, W, build_attack, four_class_images, target, ten_class_images

N_CLASSES = 10


def test_no_attack_plants_nothing_and_has_no_triggered_test_set():
    x_NHWC, y_N = four_class_images()
    attack = none.NoAttack(None, target(n=1000))  # n_poison is moot: nothing is planted
    ps = attacks.poison_training_set(attack, x_NHWC, y_N, 4)
    assert ps.n_poison == 0 and ps.n_cover == 0
    np.testing.assert_array_equal(ps.x_NHWC, x_NHWC)
    trig = attacks.triggered_test_set(attack, x_NHWC, y_N, 4)
    assert trig.x_NHWC.shape == (0, H, W, C) and trig.idx.size == 0


def test_no_attack_poisons_nothing():
    x, y = ten_class_images()
    p = attacks.poison_training_set(build_attack("none", n_poison=50), x, y, N_CLASSES)
    assert p.n_poison == 0 and np.array_equal(p.x_NHWC, x)
