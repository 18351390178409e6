"""Named reference settings of the defenses: how each method's authors and the standard toolkits
run it, one entry each, registered here and nowhere else.

A variant is a set of config fields (the defense's name and settings) with its source and what it
assumes it knows. Sweeps list them by name (a spec's `defenses:`), reports and tables show the
name, and a variant that uses oracle knowledge (the true poison count, the target class) says so,
so that a table can mark it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ci_jax.errors import unknown_name


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str  # "defense/mode", e.g. "ss/every_class"
    fields: dict[str, Any]  # dotted config paths -> values; always sets defense.name
    source: str  # where this setting comes from (paper, repository and file)
    knows: str = ""  # what it assumes it knows beyond the training set and the model
    oracle: bool = False  # it uses the ground truth (poison count or target class)


def _v(name: str, fields: dict[str, Any], source: str, knows: str = "", oracle: bool = False) -> Variant:
    return Variant(name, {"defense.name": name.split("/")[0], **fields}, source, knows, oracle)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    _v("ci/authors", {"defense.ci.filters": ["mean2"], "defense.ci.rule": "threshold", "defense.ci.tau": 0.5},
       "Xiang, Miller, Kesidis, MLSP 2019: a 2x2 mean filter, impurity threshold 0.5"),
    _v("ci/project", {"defense.ci.filters": ["median3", "quant"], "defense.ci.rule": "test"},
       "ci-jax: the calibrated test rule over a 3x3 median and 8-level quantisation (benchmark_v2)"),
    _v("scan/e2", {"defense.scan.threshold": math.exp(2)},
       "BackdoorBench (SCLBD/BackdoorBench, detection_pretrain/scan.py): J* > e^2", "a clean reserve"),
    _v("scan/e", {"defense.scan.threshold": math.e},
       "backdoor-toolbox (vtu81, cleansers_tool_box/scan.py) and the authors' CT code: J* > e", "a clean reserve"),
    _v("ac/size", {"defense.ac.rule": "size", "defense.ac.reduce": "pca"},
       "ART (Trusted-AI/adversarial-robustness-toolbox, activation_defence.py): PCA to 10, relative-size < 0.35"),
    _v("ac/silhouette", {"defense.ac.rule": "silhouette", "defense.ac.reduce": "pca"},
       "ART's silhouette-scores analysis: PCA to 10, silhouette > 0.1"),
    _v("ac/ica", {"defense.ac.rule": "size", "defense.ac.reduce": "ica"},
       "Chen et al. 2018 (the paper): FastICA to 10 dimensions, relative size"),
    _v("scale_up/paper", {"defense.scale_up.min_scale": 1, "defense.scale_up.max_scale": 11,
                          "defense.scale_up.scale_step": 1, "defense.scale_up.normalise": "global",
                          "defense.scale_up.cut": "threshold", "defense.scale_up.threshold": 0.5},
       "Guo et al., ICLR 2023: scales 1..11 (the authors' release, JunfengGo/SCALE-UP), the SPC standardised by "
       "the clean images' mean and sd, T = 0.5 (BackdoorBox, core/defenses/SCALE_UP.py)", "a clean reserve"),
    _v("ibd_psc/paper", {"defense.ibd_psc.n": 5, "defense.ibd_psc.factor": 1.5, "defense.ibd_psc.xi": 0.6,
                         "defense.ibd_psc.cut": "threshold", "defense.ibd_psc.threshold": 0.9},
       "Hou et al., ICML 2024 (BackdoorBox core/defenses/IBD_PSC.py, backdoor-toolbox other_defenses_tool_box/"
       "IBD_PSC.py): n = 5 models, omega = 1.5, xi = 0.6, T = 0.9", "a clean reserve (layer selection)"),
)}
NAMES: tuple[str, ...] = tuple(VARIANTS)


def get(name: str) -> Variant:
    if name not in VARIANTS:
        raise unknown_name("defense variant", name, NAMES)
    return VARIANTS[name]
