"""A spec's `defenses:` (named reference settings of ci_jax.defenses.variants), and the summary's
marks: invalid attack cells with their reason, defenses that used oracle knowledge. No model is
trained: specs are expanded, and summaries are written from hand-made rows."""

import json
import math
from pathlib import Path

import pytest
import yaml

from ci_jax import config, sweep
from ci_jax.defenses import variants
from ci_jax.errors import UserError

CASES = [{"case": "pixel"}, {"case": "patch", "attack.name": "patch"}]
BASE = {"eval.reserve": 100, "defense.scan.threshold": 1.0}
FAIR = Path(__file__).parents[1] / "experiments" / "fair_mnist.yaml"


def test_runs_are_seeds_x_cases_x_defenses_x_grid_and_rows_name_the_variant():
    spec = sweep.expand({"base": BASE, "cases": CASES, "defenses": ["ci/authors", "scan/e"],
                         "grid": {"defense.ci.tau": [0.5, 0.7]}, "seeds": [0, 1]})
    assert spec.fields == ("case", "defense", "attack.name", "defense.ci.tau")
    assert spec.summary_fields == ("case", "defense", "defense.ci.tau")
    order = [(r.cfg.seed, r.varied["case"], r.varied["defense"], r.varied["defense.ci.tau"]) for r in spec.runs]
    # scan ignores CI's tau: its two grid values are one run, not two.
    assert order[:6] == [(0, "pixel", "ci/authors", 0.5), (0, "pixel", "ci/authors", 0.7), (0, "pixel", "scan/e", 0.5),
                         (0, "patch", "ci/authors", 0.5), (0, "patch", "ci/authors", 0.7), (0, "patch", "scan/e", 0.5)]
    assert len(spec.runs) == 12
    by = {(r.cfg.seed, r.varied["case"], r.varied["defense"], r.varied["defense.ci.tau"]): r.cfg for r in spec.runs}
    ci, scan = by[(0, "patch", "ci/authors", 0.7)], by[(1, "pixel", "scan/e", 0.5)]
    # The variant's fields over the base, the grid's over the variant's.
    assert ci.defense.name == "ci" and ci.defense.ci.filters == ("mean2",) and ci.defense.ci.rule == "threshold"
    assert ci.defense.ci.tau == 0.7 and ci.attack.name == "patch" and ci.eval.reserve == 100
    assert scan.defense.name == "scan" and scan.defense.scan.threshold == pytest.approx(math.e)
    assert sweep.columns(spec)[:5] == ["run_id", "case", "defense", "attack.name", "defense.ci.tau"]


def test_a_spec_without_defenses_has_no_defense_column():
    spec = sweep.expand({"cases": CASES, "grid": {"defense.name": ["ci", "ss"]}})
    assert spec.fields == ("case", "attack.name", "defense.name")
    assert spec.summary_fields == ("case", "defense.name")
    assert all("defense" not in r.varied for r in spec.runs) and len(spec.runs) == 4


@pytest.mark.parametrize("defenses, match", [
    (["ci/author"], "unknown defense variant 'ci/author': did you mean 'ci/authors'"),
    (["scan/e3"], "did you mean 'scan/e"),
    ([], "non-empty list of defense variant names"),
    ("ci/authors", "non-empty list of defense variant names"),
    (["ci/authors", 3], "non-empty list of defense variant names"),
    (["ci/authors", "scan/e", "ci/authors"], "lists ci/authors twice"),
])
def test_bad_defenses_are_one_user_error(defenses, match):
    with pytest.raises(UserError, match=match):
        sweep.expand({"cases": CASES, "defenses": defenses})


def test_defenses_and_a_defense_name_field_conflict():
    for spec in ({"defenses": ["ci/authors"], "grid": {"defense.name": ["ss"]}},
                 {"defenses": ["ci/authors"], "cases": [{"case": "x", "defense.name": "ss"}]}):
        with pytest.raises(UserError, match="sets defense.name beside `defenses`"):
            sweep.expand(spec)


def test_two_variants_made_equal_by_the_grid_are_an_error():
    with pytest.raises(UserError, match="defenses scan/e2 and scan/e give the same run"):
        sweep.expand({"base": BASE, "defenses": ["scan/e2", "scan/e"], "grid": {"defense.scan.threshold": [3.0]}})


def test_an_unknown_variant_stops_the_sweep_before_any_work(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({"base": BASE, "defenses": ["ac/sizes"]}))
    with pytest.raises(UserError, match="did you mean 'ac/size'"):
        sweep.run(spec_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_where_picks_runs_by_variant_and_by_config_paths():
    spec = sweep.expand({"base": BASE, "cases": CASES, "defenses": ["ci/authors", "ci/project", "scan/e"]})
    where = sweep.parse_where(["defense=ci/authors,scan/e", "attack.name=patch"])
    sweep.check_where(spec.runs, where)
    assert [(r.varied["case"], r.varied["defense"]) for r in sweep.select(spec.runs, where)] == [
        ("patch", "ci/authors"), ("patch", "scan/e")]
    assert len(sweep.select(spec.runs, sweep.parse_where(["defense.name=ci"]))) == 4
    with pytest.raises(UserError, match="did you mean 'ci/project'"):
        sweep.parse_where(["defense=ci/projet"])
    with pytest.raises(UserError, match="no run of the spec has it"):
        sweep.check_where(spec.runs, sweep.parse_where(["defense=ac/size"]))
    plain = sweep.expand({"cases": CASES})
    with pytest.raises(UserError, match="lists no `defenses`"):
        sweep.check_where(plain.runs, sweep.parse_where(["defense=ci/authors"]))


def test_a_detection_only_twin_keeps_the_variant():
    spec = sweep.expand({"base": BASE, "defenses": ["ci/authors"], "seeds": [0]})
    run = spec.runs[0]
    twin = sweep._detect_twin(run)
    assert twin.varied == run.varied and twin.varied["defense"] == "ci/authors"
    assert twin.cfg.defense.retrain is False and twin.run_id == run.detect_id


def test_the_fair_spec():
    raw = sweep.read_spec(FAIR)
    assert raw["seeds"] == [0] and raw["retrain_seeds"] == [] and raw["base"] == {"eval.reserve": 1000}
    # Every registered variant is listed (a new one must be added to the spec by hand).
    missing = [n for n in variants.NAMES if n not in raw["defenses"]]
    assert not missing, f"experiments/fair_mnist.yaml does not list {missing}"
    spec = sweep.expand(raw, where=str(FAIR))
    cases = {r.varied["case"]: r.cfg for r in spec.runs}
    assert list(cases) == ["none", "pixel", "patch", "blend", "chessboard", "static", "cross", "fourpixel", "wanet",
                           "smooth", "sig", "bpp", "adaptive_blend", "adaptive_blend paper", "badnets a2o 1%",
                           "badnets a2o 5%", "blend a2o 1%", "blend a2o 5%"]
    assert len(spec.runs) == len(cases) * len(raw["defenses"])
    assert all(r.cfg.data.dataset == "mnist" and not r.cfg.defense.retrain and r.cfg.eval.reserve == 1000
               for r in spec.runs)
    sig, paper = cases["sig"].attack, cases["adaptive_blend paper"].attack
    assert (sig.n_poison, sig.sig.delta, sig.sig.test_gain) == (1490, pytest.approx(20 / 255), 1.0)
    assert (paper.source, paper.n_poison, paper.adaptive_blend.cover_ratio) == (-1, 180, 1.0)
    assert (cases["bpp"].attack.n_poison, cases["bpp"].attack.bpp.dither) == (3000, True)
    for label, name, n in (("badnets a2o 1%", "patch", 600), ("badnets a2o 5%", "patch", 3000),
                           ("blend a2o 1%", "blend", 600), ("blend a2o 5%", "blend", 3000)):
        a = cases[label].attack
        assert (a.name, a.source, a.n_poison) == (name, -1, n), label
    assert cases["cross"].attack.cross.pattern_seed == 11 and cases["fourpixel"].attack.fourpixel.amplitude == 32 / 255
    assert "ci-jax sweep experiments/fair_mnist.yaml --out runs/fair_mnist --models runs/fair_models" in FAIR.read_text()


# -- the summary's marks ----------------------------------------------------------------------------
def _row(case, defense, seed, asr, untriggered, **more):
    cells = {m: "" for m in sweep.METRICS} | {"oracle": ""}
    return cells | {"run_id": f"{case}-{defense}-{seed}", "case": case, "defense": defense, "seed": str(seed),
                    "clean_before": "0.99", "asr_before": asr, "untriggered_before": untriggered, "removed": "10",
                    "tpr": "0.9", "fpr": "0.001", "precision": "0.9", "auc": "0.95", "tpr_at_fpr_0.001": "0.5",
                    "tpr_at_fpr_0.01": "0.8", "tpr_at_fpr_0.05": "0.9"} | more


def test_a_cell_is_judged_on_the_means_over_seeds():
    rows = [_row("a", "scan/e", 0, "0.80", "0.0"), _row("a", "scan/e", 1, "0.92", "0.0"),  # mean 0.86
            _row("b", "scan/e", 0, "0.95", "0.0"), _row("b", "scan/e", 1, "0.70", "0.0"),  # mean 0.825
            _row("c", "scan/e", 0, "0.90", "0.05"), _row("c", "scan/e", 1, "0.90", "0.15"),  # untriggered 0.10 > 0.09
            _row("none", "scan/e", 0, "", "", tpr="", precision="", auc="")]
    table = {e["case"]: e for e in sweep.aggregate(rows, ["case", "defense"])}
    assert table["a"]["cell"] == {"status": "valid", "reason": ""}
    assert table["b"]["cell"] == {"status": "invalid", "reason": "ASR 82.50 % < 85 %"}
    assert table["c"]["cell"] == {"status": "invalid", "reason": "untriggered rate 10.00 % > ASR/10"}
    assert table["none"]["cell"]["status"] == "no attack"


def test_the_summary_marks_invalid_cells_and_oracle_defenses(monkeypatch):
    monkeypatch.setitem(variants.VARIANTS, "ss/oracle_test",
                        variants.Variant("ss/oracle_test", {"defense.name": "ss"}, "a test", "the poison count", True))
    rows = [_row("pixel", "scan/e", 0, "0.92", "0.001"),
            _row("bpp", "scan/e", 0, "0.377", "0.369"),
            _row("pixel", "ss/oracle_test", 0, "0.92", "0.001"),  # oracle by its variant
            _row("pixel", "ci/authors", 0, "0.92", "0.001", oracle="the target class"),  # by its report's word
            _row("none", "scan/e", 0, "", "", tpr="", precision="", auc="")]
    table = sweep.aggregate(rows, ["case", "defense"])
    by = {(e["case"], e["defense"]): e for e in table}
    assert by[("pixel", "ss/oracle_test")]["oracle"] == "the poison count"
    assert by[("pixel", "ci/authors")]["oracle"] == "the target class"
    assert by[("pixel", "scan/e")]["oracle"] is None
    # The figures stay in the entry (summary.json) beside the status; the table does not score them.
    assert by[("bpp", "scan/e")]["tpr"] == (0.9, None)
    md = sweep.markdown(table, ["case", "defense"]).splitlines()
    head = [c.strip() for c in md[0].strip("|").split("|")]
    assert head[:4] == ["case", "defense", "seeds", "cell"] and "tpr_at_fpr_0.01" in head
    cells = {(r[0], r[1]): dict(zip(head, r)) for r in
             ([c.strip() for c in line.strip("|").split("|")] for line in md[2:7])}
    bpp = cells[("bpp", "scan/e")]
    assert bpp["cell"] == "invalid: ASR 37.70 % < 85 %; untriggered rate 36.90 % > ASR/10"
    assert [bpp[m] for m in ("tpr", "precision", "auc", "tpr_at_fpr_0.001", "tpr_at_fpr_0.01", "tpr_at_fpr_0.05")] == \
        ["-"] * 6
    assert bpp["fpr"] == "0.10 %" and bpp["removed"] == "10" and bpp["asr_before"] == "37.70 %"
    pixel = cells[("pixel", "scan/e")]
    assert pixel["cell"] == "valid" and pixel["tpr_at_fpr_0.01"] == "80.00 %" and pixel["auc"] == "0.9500"
    assert "±" not in md[2]  # one seed: no spread
    assert ("pixel", "ss/oracle_test †") in cells and ("pixel", "ci/authors †") in cells
    assert cells[("none", "scan/e")]["cell"] == "no attack"
    notes = md[7:]
    assert "- † ss/oracle_test: uses oracle knowledge (the poison count)" in notes
    assert "- † ci/authors: uses oracle knowledge (the target class)" in notes
    assert any("decided on the means over the seeds" in n for n in notes)


def test_a_metric_fewer_seeds_have_shows_its_n():
    rows = [_row("pixel", "scan/e", s, "0.92", "0.0", asr_after="0.01" if s == 0 else "") for s in (0, 1, 2)]
    table = sweep.aggregate(rows, ["case", "defense"])
    assert table[0]["n"] == {"asr_after": 1} and table[0]["seeds"] == 3
    line = sweep.markdown(table, ["case", "defense"]).splitlines()[2]
    assert "| 1.00 % (n=1) |" in line and "| 0.00 % |" not in line


def test_summarize_groups_by_case_and_variant_and_marks_the_grid(tmp_path, monkeypatch):
    from ci_jax import plots

    monkeypatch.setitem(variants.VARIANTS, "ss/oracle_test",
                        variants.Variant("ss/oracle_test", {"defense.name": "ss"}, "a test", "the poison count", True))
    rows = [_row(case, d, s, asr, unt) for case, asr, unt in (("pixel", "0.92", "0.001"), ("bpp", "0.377", "0.369"))
            for d in ("scan/e", "ss/oracle_test") for s in (0, 1)]
    fields = ["case", "defense"]
    (tmp_path / "sweep.json").write_text(json.dumps({"spec": {}, "fields": fields, "summary_fields": fields,
                                                     "run_ids": [r["run_id"] for r in rows]}))
    sweep.write_rows(tmp_path / "results.csv", ["run_id", *fields, "seed", *sweep.METRICS, "oracle"], rows)
    drawn, rocs = {}, []
    monkeypatch.setattr(plots, "defense_grid", lambda path, title, attacks, defenses, cells:
                        drawn.update(attacks=attacks, defenses=defenses))
    monkeypatch.setattr(sweep, "_roc_per_attack", lambda out, rows, attack_fields, label: rocs.append(label))
    summary = sweep.summarize(tmp_path)
    assert [(e["case"], e["defense"], e["seeds"]) for e in summary["rows"]] == [
        ("pixel", "scan/e", 2), ("pixel", "ss/oracle_test", 2), ("bpp", "scan/e", 2), ("bpp", "ss/oracle_test", 2)]
    assert drawn == {"attacks": ["pixel", "bpp (invalid)"], "defenses": ["scan/e", "ss/oracle_test †"]}
    assert rocs == ["defense"]
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["rows"][2]["cell"]["status"] == "invalid" and written["rows"][1]["oracle"] == "the poison count"
    assert "invalid: ASR 37.70 % < 85 %" in (tmp_path / "summary.md").read_text()


def test_a_results_csv_from_before_the_new_columns_reads_and_one_missing_some_is_damaged(tmp_path):
    old_metrics = [m for m in sweep.METRICS if m not in sweep.LATER_COLUMNS]
    need = ["run_id", "case", "seed", *sweep.METRICS, "oracle"]
    sweep.write_rows(tmp_path / "old.csv", ["run_id", "case", "seed", *old_metrics],
                     [{"run_id": "a", "case": "pixel", "seed": 0, "tpr": 0.5}])
    rows = sweep.read_rows(tmp_path / "old.csv", need)
    assert rows[0]["tpr"] == "0.5" and "tpr_at_fpr_0.01" not in rows[0]
    assert sweep.aggregate(rows, ["case"])[0]["tpr_at_fpr_0.01"] is None
    sweep.write_rows(tmp_path / "cut.csv", [c for c in need if c != "tpr_at_fpr_0.01"],
                     [{"run_id": "a", "case": "pixel", "seed": 0, "tpr": 0.5}])
    with pytest.raises(sweep.Damaged, match="no column tpr_at_fpr_0.01"):
        sweep.read_rows(tmp_path / "cut.csv", need)


def test_every_variant_expands_to_a_valid_config():
    for name, v in variants.VARIANTS.items():
        cfg = config.preset("default", {"eval.reserve": 100, **v.fields})
        assert cfg.defense.name == name.split("/")[0]
