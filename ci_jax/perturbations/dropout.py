"""dropout: dropout at inference on the penultimate features (the input of the model's final linear
layer, `head`, which every project model has): a `rate` share of them zeroed, the others scaled
by 1 / (1 - rate), as inverted dropout at training time.

It is a transformed copy of the model: the mask is drawn once per pass, from the seed, and zeroes
the head's kernel rows of the dropped features, so one compiled forward serves every image. Unlike
Monte-Carlo dropout, every image of a pass loses the same features. The masks of a severity ladder
are nested (the features dropped at a rate are also dropped at every higher one).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ci_jax.errors import UserError
from ci_jax.perturbations.base import ModelTransform, Perturbation
from ci_jax.settings import section, setting

SALT = 0x64726F70  # its random stream apart from the other perturbations', at the same seed


@section
class Settings:
    rate: float = setting(0.2, "share of the penultimate features dropped", low=0.0, high=0.99, low_open=True)


def kept_D(seed: int, d: int, rate: float) -> jax.Array:
    """1 / (1 - rate) for each kept feature, 0 for each dropped one."""
    u_D = jax.random.uniform(jax.random.fold_in(jax.random.key(seed), SALT), (d,))
    return jnp.where(u_D >= rate, 1.0 / (1.0 - rate), 0.0).astype(jnp.float32)


def drop_features(rate: float, seed: int) -> ModelTransform:
    def transform(graphdef: Any, state: Any) -> Any:
        model = nnx.merge(graphdef, state, copy=True)
        head = getattr(model, "head", None)
        if not isinstance(head, nnx.Linear):
            raise UserError("dropout drops the input features of the model's final linear layer `head`, "
                            f"which {type(model).__name__} does not have")
        head.kernel[...] = head.kernel[...] * kept_D(seed, head.kernel.shape[0], rate)[:, None]
        return nnx.state(model)
    return transform


DROPOUT = Perturbation("dropout", lambda s, seed: drop_features(s.rate, seed), Settings=Settings,
                       strength="rate", kind="model")
