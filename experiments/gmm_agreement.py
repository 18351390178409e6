"""How far the mixtures fitted in JAX agree with scikit-learn's on a run's real features, beside how
far either agrees with itself under another seed: the chosen k per class, each backend's seconds
(the JAX one warm, its first call apart), and CI's detection with each, from the run's cached
features and filtered passes (nothing is trained; a pass not cached yet is computed and kept).

    python experiments/gmm_agreement.py --run runs/mnist --data-dir ../shared/data/mnist \
        --seeds 0 1 2 --out experiments/results/gmm_agreement_mnist.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ci_jax import kernels

os.environ["XLA_FLAGS"] = kernels.xla_flags()

import numpy as np  # noqa: E402

from ci_jax import experiment, files, metrics  # noqa: E402
from ci_jax.defenses import ci, gmm, gmm_jax  # noqa: E402


def _ci(view, defense: ci.CI, comp_N: np.ndarray, classes: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(score per image, removed): CI's decision, with the run's filters and rule, on these mixtures."""
    names = [a.name for a in defense.s.passes(view.seed)]
    pred_filt_FN = np.stack([view.train_pass(n, None) for n in names])
    flagged_K, score_K, _ = defense.decide(view, comp_N, [dict(c) for c in classes], pred_filt_FN, names)
    return score_K[comp_N], flagged_K[comp_N]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished `ci-jax run` directory")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    run = Path(args.run)
    opened = experiment.open_run(run, data_dir=args.data_dir)
    cfg, view, prep = opened.cfg, opened.view, opened.prepared
    defense = ci.CI(cfg.defense.ci)
    out = {"run": str(run), "features": list(view.feats_ND.shape), "bic_search": cfg.defense.ci.bic_search,
           "seeds": args.seeds, "fits": {}}
    for backend, fit in (("sklearn", gmm.cluster), ("jax", gmm_jax.cluster)):
        for seed in args.seeds:
            search = defense.search(seed)
            t0 = time.perf_counter()
            comp_N, classes = fit(view.feats_ND, view.y_N, search)
            first = time.perf_counter() - t0
            if backend == "jax":  # again, warm: the programs per k are compiled now
                t0 = time.perf_counter()
                comp_N, classes = fit(view.feats_ND, view.y_N, search)
            seconds = time.perf_counter() - t0
            score_N, removed_N = _ci(view, defense, comp_N, classes)
            det = metrics.detection(prep.poisoned.is_poison_N, removed_N, score_N)
            entry = {"k": [c["k"] for c in classes], "seconds": seconds, "first_call_s": first,
                     "removed": det["removed"], "tpr": det["tpr"], "fpr": det["fpr"], "auc": det["auc"]}
            out["fits"][f"{backend} seed {seed}"] = entry
            print(backend, seed, entry, flush=True)
    ks = {name: f["k"] for name, f in out["fits"].items()}
    names = list(ks)
    out["classes_whose_k_differs"] = {f"{a} | {b}": sum(x != y for x, y in zip(ks[a], ks[b]))
                                      for i, a in enumerate(names) for b in names[i + 1:]}
    files.write_json(args.out, out)


if __name__ == "__main__":
    main()
