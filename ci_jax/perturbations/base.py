"""What a perturbation is: a mild change to the inputs or to the model whose effect on a model's
decisions a defense measures (CI's impurity, SCALE-UP's consistency, IBD-PSC's confidence).

A perturbation is a `Perturbation` with its own `Settings` section (or none), registered by name in
`ci_jax/perturbations/__init__.py`. At given settings it makes an `Applied`: the name of its pass
(which says everything that defines it: the pass is cached under it) and either

- an input transform, x_BHWC -> x_BHWC, image by image: nothing is reduced over the batch, so the
  result does not depend on how images are batched or sharded (`Trainer.predict` jits it once over
  the whole set); or
- a model transform, (graphdef, state) -> state of the same structure: a transformed copy of the
  model, jitted once per pass, so the batched forward pass is compiled once for every model.

A severity ladder is the same perturbation at several values of its `strength` field, each its own
pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ci_jax import settings

InputTransform = Callable[[jax.Array], jax.Array]
ModelTransform = Callable[[Any, Any], Any]  # (nnx.GraphDef, nnx.State) -> nnx.State


@dataclasses.dataclass(frozen=True)
class Applied:
    """A perturbation at its settings: what `View.train_pass` runs."""

    name: str  # names its cached pass, e.g. 'gaussian(sigma=1.0)'
    transform: InputTransform | None = None
    model: ModelTransform | None = None


class Perturbation:
    """A perturbation: name; kind, 'input' or 'model'; Settings, a settings section or None;
    strength, the field of Settings that a severity ladder varies (None: it has no strength); and
    build(settings, seed), its transform (an input or a model transform, as `kind` says). Made
    with those as arguments, or as a subclass that sets them (and may override `problem`)."""

    name: str
    kind: str = "input"
    Settings: type | None = None
    strength: str | None = None

    def __init__(self, name: str | None = None, build: Callable[[Any, int], Any] | None = None, *,
                 Settings: type | None = None, strength: str | None = None, kind: str | None = None) -> None:
        for attr, value in (("name", name), ("build", build), ("Settings", Settings), ("strength", strength),
                            ("kind", kind)):
            if value is not None:
                setattr(self, attr, value)

    def build(self, s: Any, seed: int) -> Any:
        raise NotImplementedError

    def make(self, s: Any, seed: int) -> Applied:
        transform = self.build(s, seed)
        return Applied(self.describe(s), model=transform) if self.kind == "model" else Applied(self.describe(s), transform)

    def describe(self, s: Any) -> str:
        """'name' or 'name(field=value,...)': every setting, so that it names the pass."""
        if s is None:
            return self.name
        return f"{self.name}({','.join(f'{f.name}={getattr(s, f.name)}' for f in dataclasses.fields(s))})"

    def problem(self, s: Any, image_shape: tuple[int, int, int]) -> str | None:
        """What keeps these settings from fitting images of this shape, or None."""
        return None

    def settings(self, **values: Any) -> Any:
        """Its settings section with `values` set (checked and normalised as a config field: 2 for a
        float is 2.0, so that a pass has one name), the defaults elsewhere; None when it has none.
        UserError for a value out of range."""
        if self.Settings is None:
            return None
        leaves = settings.leaf_map(self.Settings)
        return self.Settings(**{k: settings.check_value(dataclasses.replace(leaves[k], path=f"{self.name}.{k}"), v)
                                for k, v in values.items()})


def tap_conv(x_BHWC: jax.Array, k_HW: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """The same 2-D kernel on every channel, stride 1, as a sum of shifted copies of x (XLA fuses
    it into one elementwise loop on every backend)."""
    kh, kw = k_HW.shape
    xp = jnp.pad(x_BHWC, ((0, 0), padding[0], padding[1], (0, 0)))
    h, w = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    out = 0.0
    for i in range(kh):
        for j in range(kw):
            out = out + xp[:, i:i + h, j:j + w, :] * k_HW[i, j].astype(x_BHWC.dtype)
    return out


def image_key(key: jax.Array, x_HWC: jax.Array) -> jax.Array:
    """A random key of one image, from its own content: reproducible, independent of how images are
    batched, and with no reduction across the devices that hold a batch."""
    return jax.random.fold_in(key, jax.lax.bitcast_convert_type(jnp.sum(x_HWC), jnp.uint32))
