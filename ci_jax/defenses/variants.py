"""Named reference settings of the defenses: how each method's authors and the standard toolkits
run it, one entry each, registered here and nowhere else.

A variant is a set of config fields (the defense's name and settings) with its source, its budget
or threshold in words, and what it assumes it knows. Sweeps list them by name (a spec's
`defenses:`), reports and tables show the name, and a variant that uses oracle knowledge (the true
poison count, the target class) says so, so that a table can mark it. Each variant sets every
field its rule depends on, so that it does not change with a default. The README's table "How the
baselines are configured" is `markdown_table()` (a test keeps them equal).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ci_jax.errors import unknown_name

TRAINING_SET = "the training set and the model"


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str  # "defense/mode", e.g. "ss/every_class"
    fields: dict[str, Any]  # dotted config paths -> values; always sets defense.name
    source: str  # where this setting comes from (paper, repository and file)
    knows: str = ""  # what it assumes it knows beyond the training set and the model
    oracle: bool = False  # it uses the ground truth (poison count or target class)
    rule: str = ""  # its budget or threshold, in words


def _v(name: str, fields: dict[str, Any], source: str, rule: str, knows: str = "", oracle: bool = False) -> Variant:
    return Variant(name, {"defense.name": name.split("/")[0], **fields}, source, knows, oracle, rule)


_RESERVE = "a clean reserve (eval.reserve)"
_CI = {"defense.ci.bic_search": "ascent"}
_AC = {"defense.ac.dims": 10, "defense.ac.size": 0.35, "defense.ac.silhouette": 0.1}
_SPECTRE = {"defense.spectre.eps": 0.1, "defense.spectre.alpha": 4.0}

VARIANTS: dict[str, Variant] = {v.name: v for v in (
    _v("ci/authors", {**_CI, "defense.ci.filters": ["mean2"], "defense.ci.rule": "threshold", "defense.ci.tau": 0.5},
       "Xiang, Miller, Kesidis, MLSP 2019 (no public code found; as ci-jax reads the paper): a Gaussian "
       "mixture per class, k by BIC ascent, a 2x2 mean filter",
       "every component of a split class with impurity > 0.5"),
    _v("ci/project", {**_CI, "defense.ci.filters": ["median3", "quant@2"], "defense.ci.rule": "test",
                      "defense.ci.alpha": 0.01},
       "ci-jax (issue 23): a bank of a 3x3 median and binarisation (quant@2), one setting for MNIST and "
       "Fashion-MNIST (experiments/results/ci_bank)",
       "components whose flip share is an outlier: any false alarm over all components and filters at 1 %, "
       "calibrated by draws of the fitted clean components"),
    _v("ss/percentile", {"defense.ss.mode": "percentile", "defense.ss.eps": 0.1},
       "BackdoorBench, detection_pretrain/spectral.py (percentile 85); Tran et al. 2018's 1.5 eps",
       "the top 15 % (1.5 x eps 0.1) of every class"),
    _v("ss/every_class", {"defense.ss.mode": "every_class"},
       "backdoor-toolbox, cleansers_tool_box/spectral_signature.py",
       "1.5 x the true poison count from every class, at most half of it",
       "the true poison count", oracle=True),
    _v("ss/target_only", {"defense.ss.mode": "target_only", "defense.ss.eps": 0.1},
       "the authors, MadryLab/backdoor_data_poisoning compute_corr.py (percentile 85 of the target label)",
       "the top 15 % of the target class only",
       "the true target class", oracle=True),
    _v("spectre/paper", {**_SPECTRE, "defense.spectre.mode": "paper"},
       "Hayase et al. 2021; the authors' SewoongLab/spectre-defense quantum_filters.jl",
       "1.5 x round(0.1 n) of every class of n"),
    _v("spectre/toolbox", {**_SPECTRE, "defense.spectre.mode": "toolbox"},
       "backdoor-toolbox, cleanser.py and cleansers_tool_box/spectre/run_filters.jl",
       "1.5 x the true poison count (capped at 0.33 n) from the most spiked class only",
       "the true poison count", oracle=True),
    _v("spectre/backdoorbench", {**_SPECTRE, "defense.spectre.mode": "backdoorbench"},
       "BackdoorBench, detection_pretrain/spectre.py (percentile 0.01)",
       "1.5 x 1 % of the training set (capped at 0.33 n) from every class"),
    _v("scan/e2", {"defense.scan.threshold": math.exp(2)},
       "the authors, TDteach/Demon-in-the-Variant msrc/test.m; BackdoorBench, detection_pretrain/scan.py",
       "remove the suspect subgroup of every class with J* > e^2", _RESERVE),
    _v("scan/e", {"defense.scan.threshold": math.e},
       "backdoor-toolbox, cleansers_tool_box/scan.py",
       "remove the suspect subgroup of every class with J* > e", _RESERVE),
    _v("strip/paper", {"defense.strip.blends": 100, "defense.strip.threshold": "normal", "defense.strip.frr": 0.01},
       "Gao et al. 2019, garrisongys/STRIP notebook",
       "entropy below a normal fit's 1 % quantile of clean entropies, 100 overlays per image", _RESERVE),
    _v("strip/toolbox", {"defense.strip.blends": 100, "defense.strip.threshold": "empirical",
                         "defense.strip.frr": 0.1},
       "backdoor-toolbox, cleansers_tool_box/strip.py; BackdoorBench, detection_infer/strip.py",
       "entropy below the empirical 10 % quantile of clean entropies, 100 overlays per image", _RESERVE),
    _v("ac/size", {**_AC, "defense.ac.rule": "size", "defense.ac.reduce": "pca"},
       "ART, art/defences/detector/poison/activation_defence.py (relative-size); backdoor-toolbox, "
       "cleansers_tool_box/activation_clustering.py",
       "PCA to 10, 2-means; the smaller cluster when under 35 % of its class"),
    _v("ac/silhouette", {**_AC, "defense.ac.rule": "silhouette", "defense.ac.reduce": "pca"},
       "ART's silhouette-scores analysis (clustering_analyzer.py)",
       "PCA to 10, 2-means; the smaller cluster when under 35 % and the silhouette > 0.1"),
    _v("ac/ica", {**_AC, "defense.ac.rule": "size", "defense.ac.reduce": "ica"},
       "Chen et al. 2018 (FastICA); BackdoorBench, detection_pretrain/ac.py",
       "FastICA to 10, 2-means; the smaller cluster when under 35 % of its class"),
    _v("scale_up/paper", {"defense.scale_up.min_scale": 1, "defense.scale_up.max_scale": 11,
                          "defense.scale_up.scale_step": 1, "defense.scale_up.normalise": "global",
                          "defense.scale_up.cut": "threshold", "defense.scale_up.threshold": 0.5},
       "Guo et al., ICLR 2023: scales 1..11 (the authors' release, JunfengGo/SCALE-UP); BackdoorBox, "
       "core/defenses/SCALE_UP.py",
       "amplify by 1..11; the scaled prediction consistency, standardised by the reserve's mean and sd, at or above 0.5",
       _RESERVE),
    _v("ibd_psc/paper", {"defense.ibd_psc.n": 5, "defense.ibd_psc.factor": 1.5, "defense.ibd_psc.xi": 0.6,
                         "defense.ibd_psc.cut": "threshold", "defense.ibd_psc.threshold": 0.9},
       "Hou et al., ICML 2024; BackdoorBox core/defenses/IBD_PSC.py, backdoor-toolbox "
       "other_defenses_tool_box/IBD_PSC.py",
       "5 models with the last BatchNorm layers' gamma and beta x 1.5 (layers chosen on the reserve, xi 0.6); "
       "mean confidence in the decision at or above 0.9", _RESERVE + ", a model with BatchNorm"),
)}
NAMES: tuple[str, ...] = tuple(VARIANTS)


def get(name: str) -> Variant:
    if name not in VARIANTS:
        raise unknown_name("defense variant", name, NAMES)
    return VARIANTS[name]


def knows_text(v: Variant) -> str:
    """What a variant assumes it knows, oracle knowledge marked."""
    if v.oracle:
        return f"**oracle**: {v.knows}"
    return f"{TRAINING_SET}, {v.knows}" if v.knows else TRAINING_SET


def markdown_table() -> str:
    """The README's table of every variant: its source, its budget or threshold, what it knows."""
    rows = ["| variant | source | budget or threshold | assumes it knows |", "| --- | --- | --- | --- |"]
    rows += [f"| `{v.name}` | {v.source} | {v.rule} | {knows_text(v)} |" for v in VARIANTS.values()]
    return "\n".join(rows) + "\n"
