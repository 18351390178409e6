"""Backdoor data-poisoning attacks, each a plug-in: one module, one line below.

An attack is a seeded image transform (its trigger) with its own `Settings`, and says which
training images it poisons (label-flipping or clean-label), which cover images it adds, and how its
triggered test set is built (see `attacks.base`).
"""

from __future__ import annotations

from ci_jax.attacks import adaptive_blend, additive, blend, bpp, none, patch, pixel, sig, smooth, wanet
from ci_jax.attacks.base import (ALL_SOURCES, SELECTIONS, Attack, PoisonedSet, Target, TriggeredTest,
                                 poison_training_set, triggered_test_set, validate)
from ci_jax.errors import unknown_name

REGISTRY: dict[str, type[Attack]] = {
    "none": none.NoAttack,
    "pixel": pixel.Pixel,
    "patch": patch.Patch,
    "blend": blend.Blend,
    "chessboard": additive.Chessboard,
    "static": additive.Static,
    "cross": additive.Cross,
    "fourpixel": additive.FourPixel,
    "sig": sig.SIG,
    "wanet": wanet.WaNet,
    "adaptive_blend": adaptive_blend.AdaptiveBlend,
    "bpp": bpp.Bpp,
    "smooth": smooth.Smooth,
}
NAMES: tuple[str, ...] = tuple(REGISTRY)


def build(name: str, settings, target: Target) -> Attack:
    if name not in REGISTRY:
        raise unknown_name("attack", name, NAMES)
    return REGISTRY[name](settings, target)


__all__ = ["REGISTRY", "NAMES", "ALL_SOURCES", "SELECTIONS", "Attack", "PoisonedSet", "Target",
           "TriggeredTest", "build", "poison_training_set", "triggered_test_set", "validate"]
