"""No attack: the clean training set, for a defense's false alarms and the clean baseline."""

from __future__ import annotations

from ci_jax.attacks.base import Attack


class NoAttack(Attack):
    poisons = False

    def stamp(self, x_NHWC, rng, test):
        return x_NHWC
