"""Perturbations as plug-ins: one module each, registered below and nowhere else.

Input perturbations: mean2, mean3, median3, gaussian, noise, quant (CI's filters), amplify
(SCALE-UP's pixel amplification) and warp (a small random elastic warp). Model perturbations:
bn_scale (IBD-PSC's BatchNorm scaling) and dropout (on the penultimate features).

A defense names a perturbation by an entry: its name, at its settings, or NAME@S, at strength S
(a severity ladder is several entries: quant@2 quant@4 quant@8). A defense whose own settings
carry a perturbation's field as NAME_FIELD (CI's gaussian_sigma, noise_width, quant_levels) sets
that field; every other field is at the perturbation's default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

from ci_jax import settings
from ci_jax.errors import UserError, one_line
from ci_jax.perturbations import amplify, bn_scale, dropout, gaussian, mean, median, noise, quant, warp
from ci_jax.perturbations.base import Applied, Perturbation
from ci_jax.registry import Names, Registry

_REGISTRY: Registry[Perturbation] = Registry("perturbation")
# Live: the choices of CI's defense.ci.filters, so a perturbation registered later is accepted.
NAMES: Names = _REGISTRY.names


def register(p: Perturbation) -> None:
    """Makes `p` a perturbation every defense and config accepts by its name."""
    _REGISTRY.register(p.name, p)


for builtin in (mean.MEAN2, mean.MEAN3, median.MEDIAN3, gaussian.GAUSSIAN, noise.NOISE, quant.QUANT,
                amplify.AMPLIFY, warp.WARP, bn_scale.BN_SCALE, dropout.DROPOUT):
    register(builtin)
del builtin


def unregister(name: str) -> None:
    _REGISTRY.unregister(name)


def get(name: str) -> Perturbation:
    """The perturbation `name`; UserError with the nearest name for an unknown one."""
    return _REGISTRY.get(name)


class Entries(Sequence[str]):
    """The choices of a list of entries: every name (live), and NAME@S for each; what S may be is
    `resolve`'s to say (a settings section's `check`), with a message that names the field."""

    def __getitem__(self, i):  # type: ignore[override]
        return NAMES[i]

    def __len__(self) -> int:
        return len(NAMES)

    def __iter__(self) -> Iterator[str]:
        return iter(NAMES)

    def __contains__(self, entry: object) -> bool:
        return isinstance(entry, str) and entry.partition("@")[0] in NAMES


ENTRIES = Entries()


def resolve(entry: str, values: Any = None, where: str = "") -> tuple[Perturbation, Any]:
    """(perturbation, its settings) of an entry, 'NAME' or 'NAME@S': a field from `values`' attribute
    NAME_FIELD where it has one, the strength from S, the default elsewhere. UserError (prefixed by
    `where`) for an unknown name, a strength given to a perturbation without one, or a strength that
    does not parse or is out of range."""
    name, at, text = entry.partition("@")
    p = get(name)
    if p.Settings is None:
        if at:
            raise UserError(f"{where}{one_line(repr(entry), 60)}: {name} takes no strength")
        return p, None
    fields = {f.name: getattr(values, f"{name}_{f.name}") for f in dataclasses.fields(p.Settings)
              if hasattr(values, f"{name}_{f.name}")}
    if at:
        leaf = dataclasses.replace(settings.leaf_map(p.Settings)[p.strength], path=f"{name}.{p.strength}")
        try:
            fields[p.strength] = settings.check_value(leaf, leaf.kind(text))
        except UserError as e:  # out of range, not finite: what the value must be
            raise UserError(f"{where}{one_line(repr(entry), 60)}: {name} {p.strength}: {str(e).split(': ', 1)[-1]}") \
                from None
        except ValueError:
            word = "a whole number" if leaf.kind is int else "a number"
            raise UserError(f"{where}{one_line(repr(entry), 60)}: {name} {p.strength}: must be {word}, "
                            f"not {one_line(repr(text), 40)}") from None
    return p, p.settings(**fields)


def make(entry: str, values: Any = None, seed: int = 0) -> Applied:
    """The entry's perturbation at its settings (see `resolve`), random ones drawn from `seed`."""
    p, s = resolve(entry, values)
    return p.make(s, seed)


def describe(entry: str, values: Any = None) -> str:
    """The name of the entry's pass, e.g. 'gaussian(sigma=1.0)', 'median3'."""
    p, s = resolve(entry, values)
    return p.describe(s)


def check(entry: str, values: Any, image_shape: tuple[int, int, int], where: str = "",
          list_field: str = "filters") -> None:
    """UserError for an entry whose settings do not fit images of this shape, naming the field it
    came from: `where`NAME_FIELD (e.g. defense.ci.gaussian_sigma) or the entry in `where``list_field`."""
    p, s = resolve(entry, values, f"{where}{list_field} entry ")
    problem = p.problem(s, image_shape)
    if problem is None:
        return
    field = f"{p.name}_{p.strength}"
    if p.strength is None:
        source = p.describe(s)
    elif "@" in entry:
        source = f"{where}{list_field} entry {one_line(repr(entry), 60)}"
    else:
        source = f"{where}{field} {getattr(s, p.strength)}" if hasattr(values, field) else p.describe(s)
    raise UserError(f"{source}: {problem}")


def ladder(name: str, strengths: Sequence[Any], **values: Any) -> list[Applied]:
    """`name` at each strength (a severity ladder), its other fields from `values`: the entries'
    passes, each its own cached pass. Seeded perturbations take `values['seed']` (default 0)."""
    p = get(name)
    if p.strength is None:
        raise UserError(f"perturbation {name} takes no strength")
    seed = values.pop("seed", 0)
    return [p.make(p.settings(**{**values, p.strength: v}), seed) for v in strengths]


def field(name: str, attr: str) -> Any:
    """A defense's settings field NAME_ATTR that carries the perturbation's field `attr`: its
    default, range and meaning, kept here only (CI's gaussian_sigma, noise_width, quant_levels)."""
    leaf = settings.leaf_map(get(name).Settings)[attr]
    meta = leaf.meta
    return settings.setting(leaf.default, f"{name} filter: {meta['help']}", choices=meta["choices"],
                            low=meta["low"], high=meta["high"], low_open=meta["low_open"])


__all__ = ["Applied", "ENTRIES", "NAMES", "Perturbation", "check", "describe", "field", "get", "ladder", "make",
           "register", "resolve", "unregister"]
