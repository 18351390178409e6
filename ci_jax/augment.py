"""Training-time augmentation on the device, inside the jitted train step: a random crop after
zero padding (4 pixels, as torchvision's `RandomCrop(32, padding=4)` in the toolkits) and, where
the dataset allows it, a horizontal flip with probability 1/2 (`RandomHorizontalFlip`).

Every draw comes from (seed, global step), so training stays deterministic, a resumed run draws what
the uninterrupted one drew, and a model trained in a stack (`stack`, vmapped over members) draws
exactly what it draws alone. The global step is epoch * steps_per_epoch + step, so it names the
(epoch, step) pair. Poisons are training images and are augmented like every other; inference
(`Trainer.predict`, the defenses' passes) never is.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ci_jax import data

# train.augment's choices: off, crop only, or the dataset's own policy (crop, plus a flip where its
# spec allows one).
CHOICES: tuple[str, ...] = ("none", "crop", "dataset")
PAD = 4  # pixels of zero padding before the crop, the toolkits' value for 32x32 images
# Separates the augmentation's draws from the data order's, which folds the epoch into the same seed.
_STREAM = 0x617567


@dataclasses.dataclass(frozen=True)
class Policy:
    pad: int
    flip: bool


def policy(augment: str, dataset: str) -> Policy | None:
    """What `train.augment` asks for on `dataset`; None: no augmentation (the step as it always was)."""
    if augment == "none":
        return None
    if augment == "crop":
        return Policy(PAD, False)
    if augment == "dataset":
        return Policy(PAD, data.get_dataset(dataset).flips)
    raise ValueError(f"train.augment {augment!r} is not one of {CHOICES}")  # the config checks choices


def step_key(seed: int | jax.Array, step: int | jax.Array) -> jax.Array:
    """The key of one training step's draws; `seed` may be traced (a stack's per-member seeds)."""
    # uint32 either way: a Python int and a stacked member's traced seed give the same key.
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(jnp.asarray(seed, jnp.uint32)), _STREAM), step)


def crop_flip(x_BHWC: jax.Array, key: jax.Array, pad: int, flip: bool) -> jax.Array:
    """Each image shifted by its own offset in [-pad, pad]^2 with zeros coming in (a crop of the
    zero-padded image at a uniform position), then mirrored left-right with probability 1/2 when
    `flip`. Shapes are fixed, so it jits and vmaps."""
    b, h, w, c = x_BHWC.shape
    k_crop, k_flip = jax.random.split(key)
    offset_B2 = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
    padded = jnp.pad(x_BHWC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    crop = lambda img_HWC, o_2: jax.lax.dynamic_slice(img_HWC, (o_2[0], o_2[1], 0), (h, w, c))
    out_BHWC = jax.vmap(crop)(padded, offset_B2)
    if flip:
        mirror_B = jax.random.bernoulli(k_flip, 0.5, (b,))
        out_BHWC = jnp.where(mirror_B[:, None, None, None], out_BHWC[:, :, ::-1, :], out_BHWC)
    return out_BHWC


def apply(p: Policy | None, x_BHWC: jax.Array, seed: int | jax.Array, step: int | jax.Array) -> jax.Array:
    """The batch of global step `step` as the model trains on it."""
    if p is None:
        return x_BHWC
    return crop_flip(x_BHWC, step_key(seed, step), p.pad, p.flip)
