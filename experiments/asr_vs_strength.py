"""ASR of one trained baseline at several test-time trigger strengths (a field that only changes the
triggered test set, e.g. attack.sig.test_gain or attack.adaptive_blend.test_alpha): one training,
one pass per value, instead of one training per value.

    python experiments/asr_vs_strength.py --run runs/prewarm2/runs/RUN_ID --models runs/fair_models \
        --data-dir ../shared/data/mnist --field attack.sig.test_gain --values 1 2 3 4 --out sig_gain.json

Writes JSON: per value, ASR and the untriggered target rate of the same scored test images (the
valid-cell rule of the fair benchmark: ASR >= 85 % and the untriggered rate <= ASR / 10).
"""

from __future__ import annotations

import argparse
from pathlib import Path


from ci_jax import attacks, checkpoint, data, files, metrics, train
from ci_jax import config as config_lib
from ci_jax import experiment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a finished sweep run directory (its config.json)")
    ap.add_argument("--models", required=True, help="the sweep's --models (or --out) directory")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--field", required=True, help="a test-time-only attack field")
    ap.add_argument("--values", type=float, nargs="+", required=True)
    ap.add_argument("--out", required=True, help="JSON file to write")
    a = ap.parse_args()
    cfg = experiment.config_from_run(files.read_json(Path(a.run) / "config.json"), a.run)
    dataset = data.load(cfg.data.dataset, a.data_dir)
    p = experiment.prepare(cfg, dataset)
    baseline_dir = Path(a.models) / "baselines" / p.model_key
    if not checkpoint.finished(baseline_dir, p.model_key):
        raise SystemExit(f"no finished baseline at {baseline_dir}")
    model = train.Trainer(cfg, dataset.x_train.shape[1:], dataset.num_classes,
                          train.steps_per_epoch(len(p.poisoned.y_N), cfg.train.batch_size))
    checkpoint.load(model, baseline_dir)
    pred_test, _ = model.predict(dataset.x_test, desc="test")
    rows = []
    for v in a.values:
        c = config_lib.replace(cfg, {a.field: v})
        target = attacks.Target(c.attack.source, c.attack.target, c.attack.n_poison, c.attack.selection, c.seed)
        attack = attacks.build(c.attack.name, c.attack_settings(), target)
        trig = attacks.triggered_test_set(attack, dataset.x_test, dataset.y_test, dataset.num_classes)
        on = p.scored_N[trig.idx]
        pred_trig, _ = model.predict(trig.x_NHWC[on], desc=f"{a.field}={v:g}")
        rows.append({"value": v, "asr": metrics.attack_success_rate(pred_trig, c.attack.target),
                     "target_rate_untriggered": metrics.attack_success_rate(pred_test[trig.idx][on], c.attack.target),
                     "images": int(on.sum())})
        print(rows[-1])
    files.write_json(Path(a.out), {"run": str(a.run), "model_key": p.model_key, "field": a.field,
                                   "config": config_lib.to_dict(cfg), "rows": rows,
                                   "clean_acc": metrics.accuracy(pred_test[p.scored_N], dataset.y_test[p.scored_N])})


if __name__ == "__main__":
    main()
