"""bn_scale: the scale (gamma) and bias (beta) of the model's last `layers` BatchNorm layers
multiplied by `factor`, IBD-PSC's parameter-oriented scaling (Hou et al., ICML 2024): a backdoor's
decisions survive an amplified model, clean decisions lose confidence.

The layers are counted in the order their modules are assigned in the models' constructors
(`models.assignment_order`), which for the project's models is the order the forward pass runs them
(the IBD-PSC references count PyTorch's `model.modules()`, also in registration order). Running
statistics are left as they are.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from ci_jax import models
from ci_jax.errors import UserError
from ci_jax.perturbations.base import ModelTransform, Perturbation
from ci_jax.settings import section, setting


@section
class Settings:
    factor: float = setting(1.5, "factor on the scale and bias of each BatchNorm layer scaled (IBD-PSC's omega)",
                            low=0.0, high=1e6, low_open=True)
    layers: int = setting(1, "BatchNorm layers scaled: the last ones of the forward pass", low=1, high=10_000)


def bn_layers(model: nnx.Module) -> list[nnx.BatchNorm]:
    """The model's BatchNorm layers in its `layer_order` (the order its constructors assigned them:
    `models.create` keeps it through split and merge); for a model without one, in the order of its
    attributes as they are (after a merge: by name)."""
    found = {".".join(map(str, path)): m for path, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)}
    order = getattr(model, "layer_order", None) or models.assignment_order(model)
    return [found[p] for p in order if p in found] + [found[p] for p in sorted(set(found) - set(order))]


def count_layers(graphdef: Any, state: Any) -> int:
    """How many BatchNorm layers the model (graphdef, state) has."""
    return len(bn_layers(nnx.merge(graphdef, state, copy=True)))


def scale_last(layers: int, factor: float) -> ModelTransform:
    def transform(graphdef: Any, state: Any) -> Any:
        model = nnx.merge(graphdef, state, copy=True)  # a copy: the baseline's own state stays as it is
        bns = bn_layers(model)
        if layers > len(bns):
            raise UserError(f"bn_scale scales the last {layers} BatchNorm layers, but the model has {len(bns)}: "
                            "lower the layers, or choose a model with BatchNorm (resnet20, resnet18)")
        for bn in bns[len(bns) - layers:]:
            for v in (bn.scale, bn.bias):
                if v is not None:  # a layer without its scale or bias (use_scale, use_bias false)
                    v[...] = v[...] * factor
        return nnx.state(model)
    return transform


BN_SCALE = Perturbation("bn_scale", lambda s, seed: scale_last(s.layers, s.factor), Settings=Settings,
                        strength="factor", kind="model")
