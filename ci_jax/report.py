"""The report of a run (report.json), typed: what `experiment.run` returns and writes, and what the
CLI and sweeps read back, by attribute.

In JSON the defense's section holds its detection figures (`metrics.detection`) and timings, and
the defense's own report under its own name (`"defense": {"name": "ci", "tpr": ..., "ci": {...}}`),
so that nothing a defense reports can overwrite a figure of the detection. A report of ci-jax 0.2,
whose defense merged its own keys in flat, reads back in this layout (a sweep that goes on over
runs of 0.2 keeps their rows).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ci_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Scores:
    """Clean accuracy and ASR of a model, on the scored test images and their triggered copies;
    None where there is nothing to measure (no attack: no ASR; retraining skipped: neither)."""

    clean_acc: float | None
    asr: float | None
    target_rate_untriggered: float | None = None  # the same images untriggered, taken for the target
    checkpoint: str | None = None  # the model's directory, relative to the run's
    skipped: bool = False  # defense.retrain false: no model was retrained

    def to_json(self) -> dict[str, Any]:
        if self.skipped:
            return {"skipped": True, "clean_acc": None, "asr": None}
        out = {"clean_acc": self.clean_acc, "asr": self.asr, "target_rate_untriggered": self.target_rate_untriggered}
        return out | ({"checkpoint": self.checkpoint} if self.checkpoint is not None else {})

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Scores:
        return cls(d["clean_acc"], d["asr"], d.get("target_rate_untriggered"), d.get("checkpoint"),
                   bool(d.get("skipped", False)))


@dataclasses.dataclass(frozen=True)
class Detection:
    """`metrics.detection`: what the defense removed against the ground truth."""

    removed: int
    tpr: float | None
    fpr: float | None
    precision: float | None
    auc: float | None
    removed_poisons: int
    poisons: int
    removed_clean: int
    clean_images: int
    denominators: dict[str, str]
    covers: int | None = None
    removed_covers: int | None = None
    removed_per_class: dict[str, int] | None = None
    # TPR at FPR <= x for each x of metrics.OPERATING_POINTS, keyed str(x); None in a report written
    # before it was measured.
    tpr_at_fpr: dict[str, float | None] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items()
               if v is not None or k in ("tpr", "fpr", "precision", "auc")}
        # The operating points beside the AUC, as metrics.detection orders them.
        head = [k for k in ("removed", "tpr", "fpr", "precision", "auc", "tpr_at_fpr") if k in out]
        return {k: out[k] for k in head} | out


@dataclasses.dataclass(frozen=True)
class DefenseReport:
    name: str
    detection: Detection
    timings_s: dict[str, float]  # the defense's own stages; empty when its result was cached
    own: dict[str, Any]  # the defense's own report (e.g. CI's classes and components)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, **self.detection.to_json(), "timings_s": self.timings_s, self.name: self.own}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DefenseReport:
        """Also a section written by ci-jax 0.2, whose own keys were merged in flat."""
        fields = {f.name for f in dataclasses.fields(Detection)}
        own = d[d["name"]] if d["name"] in d else {k: v for k, v in d.items() if k not in fields | {"name", "timings_s"}}
        return cls(d["name"], Detection(**{k: v for k, v in d.items() if k in fields}), dict(d["timings_s"]), dict(own))


@dataclasses.dataclass(frozen=True)
class Report:
    config: dict[str, Any]  # every setting, in sections (config.json's content)
    data: dict[str, Any]  # the dataset's name, content hash, and how many images were used how
    attack: dict[str, Any]  # poisons, covers, on which images ASR is measured
    baseline: Scores
    defense: DefenseReport
    retrained: Scores
    device: dict[str, Any]
    timings_s: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "data": self.data, "attack": self.attack,
                "baseline": self.baseline.to_json(), "defense": self.defense.to_json(),
                "retrained": self.retrained.to_json(), "device": self.device, "timings_s": self.timings_s}

    @classmethod
    def from_json(cls, d: Any, where: str = "report.json") -> Report:
        """A report read back; UserError when it is not one of this version's reports."""
        try:
            return cls(dict(d["config"]), dict(d["data"]), dict(d["attack"]), Scores.from_json(d["baseline"]),
                       DefenseReport.from_json(d["defense"]), Scores.from_json(d["retrained"]), dict(d["device"]),
                       dict(d["timings_s"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{where} is not a report of this ci-jax ({type(e).__name__}: {e}): "
                            "rerun the run to write it anew") from None
