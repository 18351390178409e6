"""SCAn (Tang, Wang, Tang, Zhang, "Demon in the Variant: Statistical Analysis of DNNs for Robust
Backdoor Contamination Detection", USENIX Security 2021), as the authors' code runs it
(github.com/TDteach/Demon-in-the-Variant, msrc/*.m).

Untangling model: a centred feature vector is r = mu_y + e, the identity mu_y ~ N(0, S_mu) of its
class plus a variation e ~ N(0, S_e) shared by every class. S_mu and S_e are fitted by EM on a
small clean set (the held-out reserve). Then, per labelled class, on its training and reserve
features: a two-subgroup split (2-means in the metric F = S_e^-1) against one identity, scored by
the log-likelihood ratio J_k = mean((r - mu)' F (r - mu) - (r - u_z)' F (r - u_z)). A class whose
J_k is an outlier among the classes, J*_k = (J_k - median J) / (1.4826 MAD J) > threshold, holds two
identities: its subgroup with fewer reserve images is the poison and is removed.

Threshold (`threshold`): e^2 by default, as the authors (TDteach/Demon-in-the-Variant msrc/test.m,
`sum(a > exp(2))`; msrc/online_test.m, `thr = exp(2)`), BackdoorBench (detection_pretrain/scan.py,
`threshold = np.exp(2)`) and backdoor-toolbox's confusion-training inference
(cleansers_tool_box/CT_feature_inference.py); backdoor-toolbox's SCAn cleanser takes e
(cleansers_tool_box/scan.py, `threshold = np.e`). Named variants: scan/e2 and scan/e
(ci_jax/defenses/variants.py).

Assumptions: poisons of a class carry a second identity (the trigger) in the features; the
reserve is clean and holds every class. F = pinv(S_e) comes from the reserve alone, so a feature
that is dead on clean images but fires for the trigger gets no weight (as in the authors' design).
The median/MAD normalisation needs several classes: with 2 it cannot flag anything
(J* <= 1/1.4826), with 3-4 it is weak.

Deviations: J* is one-sided (a class less split than the others is not suspicious; the authors'
calc_anomaly_index.m has this form commented out and takes |J - median|, as do all the Python
ports). The one-identity mean is the posterior mean S_mu (N S_mu + S_e)^+ sum r. The authors' EM
step (msrc/global_model.m) forms it as -S_e G sum r with G = -(n S_mu + S_e)^+ S_mu F (`G = G*SuF`),
which is the same matrix where S_e is invertible; their calc_test (msrc/local_model.m and
msrc/online_update.m) has G = -(N S_mu + S_e)^+ without the S_mu F factor and so uses
S_e (N S_mu + S_e)^+ sum r, as the Python ports do (pysrc/SCAn.py, backdoor-toolbox, BackdoorBench).
Pseudo-inverses throughout, as the authors' F = pinv(S_e), since ReLU features can have dead
dimensions. Where EM has not converged after EM_ITERS steps the last estimate is used and the
report says so (the Matlab gives up). A class that 2-means cannot split in two is scored 0 and
keeps its images.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ci_jax.defenses.base import Defense, Result, View, timed
from ci_jax.errors import UserError
from ci_jax.settings import section, setting

EM_TOL = 1e-5
EM_ITERS = 100
SPLIT_ITERS = 100


@section
class Settings:
    threshold: float = setting(float(np.exp(2)), "flag a class whose normalised J* exceeds this: e^2 (the authors' "
                               "msrc/test.m, BackdoorBench detection_pretrain/scan.py) or e (backdoor-toolbox "
                               "cleansers_tool_box/scan.py)", low=0.0, low_open=True)


def global_model(x_ND: np.ndarray, y_N: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """(S_mu, S_e, converged) by EM on centred clean features (joint Bayesian, Chen et al., ECCV 2012)."""
    labels = np.unique(y_N)
    onehot = (y_N[:, None] == labels[None, :]).astype(np.float64)
    counts = onehot.sum(0)
    sums = onehot.T @ x_ND
    mu_KD = sums / counts[:, None]
    s_mu = np.cov(mu_KD[np.searchsorted(labels, y_N)], rowvar=False)
    s_e = np.cov(x_ND - mu_KD[np.searchsorted(labels, y_N)], rowvar=False)
    for _ in range(EM_ITERS):
        mu_KD = np.stack([s_mu @ np.linalg.pinv(n * s_mu + s_e) @ s for n, s in zip(counts, sums)])
        mu_ND = mu_KD[np.searchsorted(labels, y_N)]
        new_mu, new_e = np.cov(mu_ND, rowvar=False), np.cov(x_ND - mu_ND, rowvar=False)
        change = np.linalg.norm(new_mu - s_mu) + np.linalg.norm(new_e - s_e)
        s_mu, s_e = new_mu, new_e
        if change < EM_TOL:
            return s_mu, s_e, True
    return s_mu, s_e, False


def split(x_ND: np.ndarray, f_DD: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two subgroups (bool per row) by 2-means in the metric F."""
    n = len(x_ND)
    z = rng.random(n) >= 0.5
    if n >= 2 and (z.all() or not z.any()):
        z[0] = not z[0]
    for _ in range(SPLIT_ITERS):
        if z.all() or not z.any():
            break
        u1, u2 = x_ND[z].mean(0), x_ND[~z].mean(0)
        new = (u1 @ f_DD @ u1 - u2 @ f_DD @ u2 - 2 * x_ND @ f_DD @ (u1 - u2)) < 0
        if (new == z).all() or (new == ~z).all():
            break
        z = new
    return z


def statistic(x_ND: np.ndarray, z: np.ndarray, s_mu: np.ndarray, s_e: np.ndarray, f_DD: np.ndarray) -> float:
    """J: how much better two identities explain the class than one."""
    n = len(x_ND)
    if n < 2 or z.all() or not z.any():
        return 0.0
    mu = s_mu @ np.linalg.pinv(n * s_mu + s_e) @ x_ND.sum(0)
    one = x_ND - mu
    two = x_ND - np.where(z[:, None], x_ND[z].mean(0), x_ND[~z].mean(0))
    return float((((one @ f_DD) * one).sum(1) - ((two @ f_DD) * two).sum(1)).mean())


def anomaly_index(js: np.ndarray) -> np.ndarray:
    """J* of every class: how far its J lies above the classes' median, in robust standard
    deviations (1.4826 MAD); 0 at or below the median, and everywhere when the MAD is 0."""
    mad = 1.4826 * np.median(np.abs(js - np.median(js)))
    return np.maximum(0.0, js - np.median(js)) / mad if mad > 0 else np.zeros_like(js)


class SCAn(Defense):
    Settings = Settings
    needs_reserve = True

    def run(self, view: View) -> Result:
        return timed_result(lambda: self._run(view))

    def _run(self, view: View) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        r = view.need_reserve("scan")
        missing = sorted(set(view.classes()) - set(np.unique(r.y_N).tolist()))
        if missing:
            raise UserError(f"defense scan: the reserve holds no image of class(es) {missing}: raise --eval.reserve")
        clean = r.feats_ND.astype(np.float64)
        s_mu, s_e, converged = global_model(clean - clean.mean(0), r.y_N)
        f_DD = np.linalg.pinv(s_e)
        feats = np.concatenate([view.feats_ND, r.feats_ND]).astype(np.float64)
        feats -= feats.mean(0)
        labels = np.concatenate([view.y_N, r.y_N])
        from_reserve = np.arange(len(labels)) >= len(view.y_N)
        rng = np.random.default_rng(view.seed)
        per_class = []
        for c in view.classes():
            idx = np.flatnonzero(labels == c)
            z = split(feats[idx], f_DD, rng)
            j = statistic(feats[idx], z, s_mu, s_e, f_DD)
            # The poison subgroup is the one with fewer clean (reserve) images.
            sus = z if from_reserve[idx][z].sum() < from_reserve[idx][~z].sum() else ~z
            per_class.append((c, idx, z, sus, j))
        j_star = anomaly_index(np.array([j for *_, j in per_class]))
        n = len(view.y_N)
        score_N, removed_N = np.zeros(n), np.zeros(n, bool)
        classes = []
        for (c, idx, z, sus, j), js_c in zip(per_class, j_star):
            train_idx = idx[~from_reserve[idx]]
            sus_train = sus[~from_reserve[idx]]
            two = bool(z.any() and not z.all())  # 2-means found two subgroups
            if two:
                # Inside a class, how much closer to the suspect subgroup's mean: orders its images.
                u_sus, u_other = feats[idx][sus].mean(0), feats[idx][~sus].mean(0)
                d_sus = (((feats[train_idx] - u_sus) @ f_DD) * (feats[train_idx] - u_sus)).sum(1)
                d_other = (((feats[train_idx] - u_other) @ f_DD) * (feats[train_idx] - u_other)).sum(1)
                score_N[train_idx] = js_c / (1 + np.exp(np.clip(d_sus - d_other, -50, 50)))
            flagged = two and bool(js_c > self.s.threshold)
            if flagged:
                removed_N[train_idx[sus_train]] = True
            classes.append({"label": c, "J": j, "J_star": float(js_c), "flagged": flagged,
                            "suspect_subgroup": int(sus_train.sum()), "size": int(train_idx.size),
                            **view.poisons_in(train_idx)})
        return score_N, removed_N, {"em_converged": converged, "classes": classes}


def timed_result(fn) -> Result:
    (score_N, removed_N, report), seconds = timed(fn)
    return Result(score_N=score_N, is_clean_N=~removed_N, report=report, timings_s={"scoring": seconds})
