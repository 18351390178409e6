"""Per perturbation of CI's bank, the poison components' flip share against the clean components'
(issue 23), from the reports of a finished sweep:
    python experiments/ci_bank_profiles.py runs/ci_bank experiments/results/ci_bank/profiles.json
A component counts as a poison one when most of its images are poisons. For each CI run: per
filter, the clean components' median and largest flip share, their fitted spread and the critical
z, and for each poison component its size, flip share, z and whether the rule flagged it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ci_jax import files


def profile(report: dict) -> dict:
    ci = report["defense"]["ci"]
    comps = [c for cl in ci["classes"] for c in cl["components"]]
    out = {}
    for name in ci["filters"]:
        clean = sorted(c["flips"][name] / c["size"] for c in comps if c["size"] and c.get("poisons", 0) * 2 <= c["size"])
        est = ci.get("clean_estimates", {}).get(name, {})
        out[name] = {
            "clean_components": len(clean),
            "clean_median_share": clean[len(clean) // 2] if clean else None,
            "clean_largest_share": clean[-1] if clean else None,
            **{k: est[k] for k in ("overdispersion_sd", "z_critical") if k in est},
            "poison_components": [{"size": c["size"], "poisons": c["poisons"], "share": c["flips"][name] / c["size"],
                                   **({"z": c["z"][name]} if "z" in c else {}), "flagged": c["flagged"]}
                                  for c in comps if c["size"] and c.get("poisons", 0) * 2 > c["size"]],
        }
    return out


def main(sweep_dir: str, out: str) -> None:
    rows = []
    for path in sorted(Path(sweep_dir, "runs").glob("*/report.json")):
        report = json.loads(path.read_text())
        if report["defense"].get("name") != "ci":
            continue
        cfg = report["config"]
        rows.append({"dataset": cfg["data"]["dataset"], "attack": cfg["attack"]["name"],
                     "filters": cfg["defense"]["ci"]["filters"], "rule": cfg["defense"]["ci"]["rule"],
                     "removed": report["defense"]["removed"], "tpr": report["defense"].get("tpr"),
                     "fpr": report["defense"]["fpr"], "profile": profile(report)})
    rows.sort(key=lambda r: (r["dataset"], r["attack"], r["rule"]))
    files.write_json(out, {"sweep": sweep_dir, "runs": rows})
    for r in rows:
        print(r["dataset"], r["attack"], r["rule"], r["removed"])
        for name, p in r["profile"].items():
            pz = [(round(c["share"], 3), round(c.get("z", float("nan")), 1), c["flagged"]) for c in p["poison_components"]]
            print(f"   {name:18s} clean median {p['clean_median_share']:.4f} largest {p['clean_largest_share']:.3f} "
                  f"crit {p.get('z_critical', float('nan')):.2f} poison {pz}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
