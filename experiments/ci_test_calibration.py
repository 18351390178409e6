"""How often CI's `test` rule flags anything in families of clean components only (issue 23): its
false-alarm rate against its level alpha, over simulated families whose clean components differ
(overdispersion), beside the rule it replaced (Bonferroni's normal quantile, the spread from the
upper quartile taken as known).
    python experiments/ci_test_calibration.py experiments/results/ci_bank/test_calibration.json [DRAWS]
Each regime: K components of 300 to 3,000 images, F filters, each component's true flip share
normal about asin(sqrt(base)) on the arcsine scale with sd `sd` (clipped to [0, pi/2]), flips
binomial. The last regime is MNIST's under a 2x2 mean: half of the components flip nothing."""

from __future__ import annotations

import math
import sys
import time

import numpy as np
from scipy import stats

from ci_jax import files
from ci_jax.defenses import ci

REGIMES = [  # (K, F, sd, base)
    (12, 3, 0.05, 0.03),
    (30, 3, 0.0, 0.03),
    (30, 3, 0.15, 0.03),
    (38, 3, 0.10, 0.005),
    (38, 3, 0.19, 0.0003),
]
ALPHA = 0.01


def bonferroni_rule(flips_FK: np.ndarray, size_K: np.ndarray, alpha: float) -> bool:
    """The rule before (ci-jax up to 91b1970): Q3 spread taken as known, Bonferroni's quantile."""
    a = np.arcsin(np.sqrt((flips_FK + 3 / 8) / (size_K + 3 / 4)))
    noise = 1.0 / (4 * size_K + 2)
    centre = np.median(a, axis=1, keepdims=True)
    spread2 = (1.4826 * (np.quantile(a, 0.75, axis=1, keepdims=True) - centre)) ** 2
    between2 = np.maximum(0.0, spread2 - np.median(noise))
    z = (a - centre) / np.sqrt(between2 + noise)
    return bool((z > stats.norm.isf(alpha / z.size)).any())


def main(out: str, draws: int = 500) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for k, f, sd, base in REGIMES:
        t0 = time.perf_counter()
        new = old = 0
        for _ in range(draws):
            size = rng.integers(300, 3000, k).astype(float)
            a = np.clip(np.arcsin(np.sqrt(base)) + rng.normal(0, sd, (f, k)), 0, np.pi / 2)
            flips = rng.binomial(size.astype(np.int64), np.sin(a) ** 2).astype(float)
            new += bool(ci.flip_test(flips, size, np.ones(k, bool), ALPHA)[1].any())
            old += bonferroni_rule(flips, size, ALPHA)
        se = math.sqrt(ALPHA * (1 - ALPHA) / draws)
        rows.append({"components": k, "filters": f, "overdispersion_sd": sd, "base_share": base, "draws": draws,
                     "false_alarm_rate": new / draws, "false_alarm_rate_bonferroni": old / draws,
                     "binomial_se_at_alpha": se, "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    files.write_json(out, {"alpha": ALPHA, "what": "share of clean families with any component flagged",
                           "regimes": rows})


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
