"""Figures for a run: poisoned examples, per-class BIC curves, component impurities, ROC curves.

Every figure is written atomically (a reader never sees a half-written PNG) and then closed,
so long experiment loops do not accumulate open figures.
"""

from __future__ import annotations

import math
import os

import matplotlib

# Headless: runs happen on servers without a display, and Agg needs no GUI toolkit.
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (must come after the backend is chosen)
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ci_jax import files  # noqa: E402

PathLike = str | os.PathLike
FLAGGED_COLOR = "tab:red"
CLEAN_COLOR = "0.6"


def _save(fig: Figure, path: PathLike) -> None:
    # Close even when saving fails, so a bad path cannot leak figures.
    try:
        files.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def _message(path: PathLike, text: str) -> None:
    """A placeholder figure, so callers always find a PNG where they expect one."""
    fig, ax = plt.subplots(figsize=(4, 2))
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    _save(fig, path)


def _show_image(ax, img: np.ndarray) -> None:
    img = np.asarray(img, dtype=np.float32)
    # NHW and N,H,W,1 both mean grayscale; imshow wants 2-D for a colormap to apply.
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(np.clip(img, 0.0, 1.0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def examples(path: PathLike, attacks: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]],
             n: int = 8) -> None:
    """Per attack, three rows: clean test images, the same images triggered (titles: the model's
    decisions, when given), and their difference (triggered - clean, red positive, blue negative,
    scaled to the largest change of that attack so that a 3/255 pattern shows)."""
    blocks = []
    for name, (x_clean, x_trig, pred_clean, pred_trig) in attacks.items():
        if pred_clean is None or pred_trig is None:
            pred_clean = pred_trig = np.full(len(x_clean), -1)
        count = min(max(n, 0), len(x_clean), len(x_trig), len(np.ravel(pred_clean)), len(np.ravel(pred_trig)))
        if count:
            blocks.append((name, np.asarray(x_clean)[:count], np.asarray(x_trig)[:count],
                           np.ravel(pred_clean)[:count], np.ravel(pred_trig)[:count]))
    if not blocks:
        _message(path, "no triggered images")
        return
    cols = max(len(b[1]) for b in blocks)
    fig, axes = plt.subplots(3 * len(blocks), cols, figsize=(1.3 * cols + 1.2, 3.9 * len(blocks)), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for b, (name, x_clean, x_trig, pred_clean, pred_trig) in enumerate(blocks):
        diff = (x_trig.astype(np.float32) - x_clean.astype(np.float32)).mean(-1)
        scale = float(np.abs(diff).max()) or 1.0
        for j in range(len(x_clean)):
            top, mid, low = axes[3 * b, j], axes[3 * b + 1, j], axes[3 * b + 2, j]
            for ax in (top, mid, low):
                ax.set_axis_on()
            _show_image(top, x_clean[j])
            _show_image(mid, x_trig[j])
            if int(pred_clean[j]) >= 0:
                top.set_title(f"pred {int(pred_clean[j])}", fontsize=7)
                mid.set_title(f"pred {int(pred_trig[j])}", fontsize=7)
            low.imshow(diff[j], cmap="bwr", vmin=-scale, vmax=scale, interpolation="nearest")
            low.set_xticks([])
            low.set_yticks([])
        axes[3 * b, 0].set_ylabel(f"{name}\nclean", fontsize=8)
        axes[3 * b + 1, 0].set_ylabel("triggered", fontsize=8)
        axes[3 * b + 2, 0].set_ylabel(f"difference\n(+/-{scale:.3g})", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _numbers(entry: dict, *keys: str) -> bool:
    return all(isinstance(entry.get(k), (int, float)) and not isinstance(entry.get(k), bool)
               and math.isfinite(entry[k]) for k in keys)


def loss_curves(path: PathLike, logs: dict[str, list[dict]]) -> None:
    """Training loss against the step, one line per model, from their metrics.jsonl; beside it,
    where the log has them, clean accuracy (solid) and ASR (dashed) after each epoch."""
    # A log is read line by line and a damaged line can parse into anything: numbers are checked.
    loss = {name: [(e["step"], e["loss"]) for e in entries if _numbers(e, "step", "loss")]
            for name, entries in logs.items()}
    scores = {name: [e for e in entries if "mean_loss" in e and _numbers(e, "epoch", "clean_acc")
                     and (e.get("asr") is None or _numbers(e, "asr"))] for name, entries in logs.items()}
    if not any(loss.values()):
        _message(path, "no training log (models trained before logs were kept)")
        return
    with_scores = any(scores.values())
    fig, axes = plt.subplots(1, 2 if with_scores else 1, figsize=(9.0 if with_scores else 5.0, 3.2), squeeze=False)
    ax = axes[0, 0]
    for name, pts in loss.items():
        if pts:
            steps, losses = zip(*pts)
            ax.plot(steps, losses, linewidth=1.0, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    if with_scores:
        ax = axes[0, 1]
        for i, (name, entries) in enumerate(scores.items()):
            epochs = [e["epoch"] + 1 for e in entries]
            colour = f"C{i}"
            ax.plot(epochs, [100 * e["clean_acc"] for e in entries], marker="o", color=colour, label=f"{name} clean")
            asr = [(x, 100 * e["asr"]) for x, e in zip(epochs, entries) if e.get("asr") is not None]
            if asr:
                ax.plot(*zip(*asr), marker="s", linestyle="--", color=colour, label=f"{name} ASR")
        ax.set_xlabel("epoch")
        ax.set_ylabel("%")
        ax.set_ylim(-2, 102)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def bic_curves(path: PathLike, classes: list[dict]) -> None:
    """One small panel per class: BIC against the number of mixture components k = 1, 2, ..."""
    if not classes:
        _message(path, "no classes")
        return

    ncols = min(5, len(classes))
    nrows = math.ceil(len(classes) / ncols)
    # constrained layout places the shared axis labels snugly; tight_layout leaves them adrift
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 2.0 * nrows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(classes):]:
        ax.set_axis_off()
    for ax, cls in zip(axes.flat, classes):
        bic = np.asarray(cls.get("bic", []), dtype=float).ravel()
        k = cls.get("k")
        ax.set_title(f"class {cls.get('label')}: k={k}", fontsize=9)
        if bic.size == 0:
            ax.text(0.5, 0.5, "no BIC", ha="center", va="center", transform=ax.transAxes)
            continue
        ks = np.arange(1, bic.size + 1)
        ax.plot(ks, bic, "o-", markersize=3, color="tab:blue")
        if k is not None and 1 <= int(k) <= bic.size:
            ax.plot([int(k)], [bic[int(k) - 1]], "*", markersize=12, color=FLAGGED_COLOR)
        ax.set_xticks(ks)
        ax.tick_params(labelsize=7)
    fig.supxlabel("k", fontsize=9)
    fig.supylabel("BIC", fontsize=9)
    _save(fig, path)


def impurities(path: PathLike, classes: list[dict], *, tau: float | None, rule: str) -> None:
    """Impurity of every component of every class; flagged components in red."""
    labels, heights, colors, poisons, xs = [], [], [], [], []
    x = 0.0
    for cls in classes:
        comps = cls.get("components", [])
        for j, comp in enumerate(comps):
            labels.append(f"c{cls.get('label')}.{j}")
            heights.append(float(comp.get("impurity", np.nan)))
            colors.append(FLAGGED_COLOR if comp.get("flagged") else CLEAN_COLOR)
            poisons.append(int(comp.get("poisons", 0) or 0))
            xs.append(x)
            x += 1.0
        if comps:
            x += 0.6  # a gap between classes makes the grouping visible without a legend
    if not labels:
        _message(path, f"no components (rule: {rule})")
        return

    fig, ax = plt.subplots(figsize=(min(max(5.0, 0.35 * len(labels) + 1.5), 30.0), 3.5))
    ax.bar(xs, heights, color=colors, width=0.8)
    show_tau = rule == "threshold" and tau is not None
    if show_tau:
        ax.axhline(float(tau), linestyle="--", color="k", linewidth=1.0, label=f"tau = {float(tau):.3g}")
        ax.legend(fontsize=8, loc="upper right")
    finite = [h for h in heights if math.isfinite(h)]
    top = max(finite + [float(tau) if show_tau else 0.0, 1e-3]) * 1.15
    for xi, h, p in zip(xs, heights, poisons):
        if p > 0:
            y = h if math.isfinite(h) else 0.0
            ax.annotate(str(p), (xi, y), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0.0, top)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_ylabel("impurity (numbers: poisons)")
    ax.set_title(f"impurity per component (rule: {rule})", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def roc(path: PathLike, curves: dict[str, tuple[np.ndarray, np.ndarray, float | None]],
        title: str = "ROC") -> None:
    """One ROC line per detector score, with its AUC in the legend. The FPR axis is logarithmic:
    a good detector's curve rises within a fraction of a percent of FPR, which a linear axis crushes
    into its corner. FPR 0 has no place on a log axis; it is drawn at the left edge, half the
    smallest FPR any curve reaches."""
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    positive = [f[f > 0] for f in (np.ravel(fpr).astype(float) for fpr, _, _ in curves.values())]
    positive = np.concatenate(positive) if positive else np.zeros(0)
    floor = float(positive.min()) / 2 if positive.size else None
    if floor is None:
        ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1.0)
    else:
        chance = np.geomspace(floor, 1.0, 50)
        ax.plot(chance, chance, linestyle="--", color="0.6", linewidth=1.0)
    for name, (fpr, tpr, auc) in curves.items():
        auc_text = "n/a" if auc is None or not math.isfinite(float(auc)) else f"{float(auc):.3f}"
        fpr = np.ravel(fpr).astype(float)
        ax.plot(fpr if floor is None else np.maximum(fpr, floor), np.ravel(tpr), linewidth=1.5,
                label=f"{name} (AUC {auc_text})")
    if curves:
        ax.legend(fontsize=8, loc="lower right")
    if floor is None:
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("false positive rate")
    else:
        ax.set_xscale("log")
        ax.set_xlim(floor, 1.0)
        ax.set_xlabel("false positive rate (log; 0 at the left edge)")
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def defense_grid(path: PathLike, title: str, attacks: list[str], defenses: list[str],
                 cells: dict[tuple[str, str], dict]) -> None:
    """Attack x defense: each cell coloured by TPR - FPR (Youden's J), with its TPR, FPR and the ASR
    after retraining where a seed was retrained written in it; means over seeds. Colouring by TPR
    alone painted a defense that removed 13.6 % of the clean images as green as one that removed
    none. cells[(attack, defense)] holds a sweep summary entry (metric -> (mean, std) or None); a
    missing cell, or one without poisons (no TPR), is grey."""
    fig, ax = plt.subplots(figsize=(1.8 + 1.45 * len(defenses), 0.9 + 0.62 * len(attacks)))
    score = np.full((len(attacks), len(defenses)), np.nan)
    for (i, a), (j, d) in ((ia, jd) for ia in enumerate(attacks) for jd in enumerate(defenses)):
        e = cells.get((a, d))
        if e is None:
            continue
        if e["tpr"] is not None and e["fpr"] is not None:
            score[i, j] = e["tpr"][0] - e["fpr"][0]
        pct = lambda m: "-" if e[m] is None else f"{100 * e[m][0]:.1f}"
        text = (f"TPR {pct('tpr')}\n" if e["tpr"] is not None else "") + f"FPR {pct('fpr')}"
        if e["asr_after"] is not None:
            text += f"\nASR after {pct('asr_after')}"
        ax.text(j, i, text, ha="center", va="center", fontsize=6.5)
    # Below 0 (worse than chance) is as red as 0: both mean the defense failed.
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="0.9")
    image = ax.imshow(np.ma.masked_invalid(score), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02).set_label("TPR - FPR (colour)", fontsize=8)
    ax.set_xticks(range(len(defenses)))
    ax.set_xticklabels(defenses, fontsize=8)
    ax.set_yticks(range(len(attacks)))
    ax.set_yticklabels(attacks, fontsize=8)
    ax.set_title(f"{title}: colour TPR - FPR; TPR, FPR and ASR after retraining, %", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def sweep_field(path: PathLike, field: str, series: dict[str, list[tuple[str, dict]]],
                metric_names: tuple[str, ...]) -> None:
    """One panel per metric that some run has (a detection-only sweep has no ASR after retraining,
    a sweep without poisons no TPR): its mean over seeds (error bars: std) against the field's
    values, one series per combination of the other varied fields. Numbers are joined by lines;
    names (defense.name) are grouped bars, since a line from one defense to the next would draw
    values in between that do not exist."""
    shown = [m for m in metric_names if any(e[m] is not None for points in series.values() for _, e in points)]
    if not shown:
        _message(path, f"{field}: no run has {', '.join(metric_names)}")
        return
    xs_all = list(dict.fromkeys(x for points in series.values() for x, _ in points))
    numeric = all(_is_number(x) for x in xs_all)
    width = 0.8 / max(len(series), 1)
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.2), squeeze=False)
    for ax, m in zip(axes[0], shown):
        for k, (label, points) in enumerate(series.items()):
            pts = [(x, e[m]) for x, e in points if e[m] is not None]
            if not pts:
                continue
            if numeric:
                pts.sort(key=lambda p: float(p[0]))  # spec order may be 1000, 0.5: a line goes left to right
            mean, std = [v[0] for _, v in pts], [v[1] or 0.0 for _, v in pts]  # one seed: no spread
            if numeric:
                ax.errorbar([float(x) for x, _ in pts], mean, yerr=std, marker="o", markersize=3, capsize=2,
                            linewidth=1, label=label)
            else:
                pos = [xs_all.index(x) - 0.4 + width * (k + 0.5) for x, _ in pts]
                ax.bar(pos, mean, width=width, yerr=std, capsize=2, label=label)
        if not numeric:
            ax.set_xticks(range(len(xs_all)))
            ax.set_xticklabels(xs_all, rotation=45, fontsize=7)
        ax.set_xlabel(field)
        ax.set_title(m, fontsize=9)
        values = [float(x) for x in xs_all] if numeric else []
        if len(values) > 2 and min(values) > 0 and max(values) / min(values) >= 50:
            ax.set_xscale("log")
    if len(series) > 1:
        axes[0, -1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    _save(fig, path)


def _is_number(x) -> bool:
    try:
        float(x)
        return True
    except (TypeError, ValueError):
        return False
