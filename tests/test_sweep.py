"""Sweeps on a tiny synthetic MNIST: expansion, sharing, restart after kill -9, shards + merge."""

import csv
import json
import re
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from ci_jax import config, experiment, files, sweep
from ci_jax.errors import UserError
from ci_jax.report import Report

pytestmark = pytest.mark.slow  # sweeps train models

BASE = {"data.dataset": "mnist", "train.epochs": 1, "train.batch_size": 32, "eval.batch_size": 128,
        "attack.n_poison": 20, "attack.pixel.amplitude": 1.0, "defense.ci.k_max": 3, "defense.ci.covariance": "diag"}
TAU = "defense.ci.tau"
SPEC = {"name": "tiny", "preset": "fast", "base": BASE, "grid": {TAU: [0.5, 1000.0]}, "seeds": [0, 1]}


@pytest.fixture(scope="module")
def data_dir(mnist_like_dir):
    return mnist_like_dir


def _spec_file(tmp_path, spec=SPEC, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_expand_orders_seeds_cases_grid_and_labels_columns():
    spec = sweep.expand({"cases": [{"case": "pixel"},
                                   {"case": "patch", "attack.name": "patch", "attack": {"patch": {"row": 2}}}],
                         "grid": {"defense.name": ["ci", "ss"]}, "seeds": [0, 1]})
    assert spec.fields == ("case", "attack.name", "attack.patch.row", "defense.name")
    assert spec.summary_fields == ("case", "defense.name")  # a case's label stands for its fields
    # Every cell once, then again with the next seed: a sweep stopped part-way covers the grid.
    assert [(r.varied["case"], r.varied["defense.name"], r.cfg.seed) for r in spec.runs][:5] == [
        ("pixel", "ci", 0), ("pixel", "ss", 0), ("patch", "ci", 0), ("patch", "ss", 0), ("pixel", "ci", 1)]
    assert len(spec.runs) == 8 and len({r.run_id for r in spec.runs}) == 8
    assert spec.runs[2].cfg.attack.name == "patch" and spec.runs[2].cfg.attack.patch.row == 2
    assert spec.runs[0].varied["attack.name"] == "pixel" and spec.runs[0].varied["attack.patch.row"] == 24


def test_expand_shows_lists_of_names_as_one_cell_and_drops_duplicate_runs():
    spec = sweep.expand({"cases": [{"case": "bank", "defense.ci.filters": ["mean2", "median3"]},
                                   {"case": "default"}],
                         "grid": {TAU: [0.5, 0.5, 1.0]}, "seeds": [0]})
    assert [r.varied["defense.ci.filters"] for r in spec.runs] == ["mean2 median3"] * 2 + ["median3"] * 2
    assert len(spec.runs) == 4  # the repeated tau is one run


def test_retrain_seeds_are_the_only_seeds_that_retrain():
    spec = sweep.expand({"grid": {TAU: [0.5, 1.0]}, "seeds": [0, 1, 2], "retrain_seeds": [1]})
    assert [(r.cfg.seed, r.cfg.defense.retrain) for r in spec.runs] == [
        (0, False), (0, False), (1, True), (1, True), (2, False), (2, False)]
    assert all(r.cfg.defense.retrain for r in sweep.expand({"seeds": [0, 1]}).runs)  # default: every seed


@pytest.mark.parametrize("bad,match", [
    ({"grid": {TAU: []}}, "grid.defense.ci.tau"),
    ({"grid": {"defense.ci.tua": [1.0]}}, "'defense.ci.tua': did you mean 'defense.ci.tau'"),
    ({"grid": {TAU: [-1.0]}}, "defense.ci.tau = -1.0: must be >= 0.0"),
    ({"grid": {"tau": [0.5]}}, "'tau'"),  # the old flat name
    ({"base": {"defense": {"ci": 3}}}, "defense.ci is a section"),
    ({"cases": [{"train.epochs": 0}]}, "case 0.*train.epochs"),
    ({"seeds": "0"}, "seeds"),
    ({"retrain_seeds": [True]}, "retrain_seeds"),
    ({"grid": {"seed": [1]}}, "seeds"),
    ({"colour": 1}, "colour"),
    ({"cases": []}, "cases"),
])
def test_bad_spec_is_one_user_error(bad, match):
    with pytest.raises(UserError, match=match):
        sweep.expand(bad)


def test_a_huge_sweep_grid_is_refused(monkeypatch):
    from ci_jax import sweep

    monkeypatch.setattr(files, "available_memory", lambda: 1 << 30)
    spec = {"grid": {"defense.ci.tau": [0.1 * i for i in range(1, 200)], "defense.ci.k_max": list(range(1, 200)),
                     "defense.ci.reg_covar": [1e-3 * i for i in range(1, 200)]}}
    with pytest.raises(UserError, match="would not fit"):
        sweep.expand(spec)


def test_shards_partition_runs_by_baseline():
    spec = sweep.expand({"grid": {TAU: [0.1, 0.5, 1.0], "attack.n_poison": [10, 20]}, "seeds": [0, 1, 2]})
    shards = [sweep.shard_runs(spec.runs, i, 4) for i in range(4)]
    ids = [r.run_id for s in shards for r in s]
    assert sorted(ids) == sorted(r.run_id for r in spec.runs)
    key = lambda r: config.fingerprint(config.model_identity(r.cfg))
    owners = [{key(r) for r in s} for s in shards]
    assert all(not (a & b) for i, a in enumerate(owners) for b in owners[i + 1:])
    assert sum(map(len, owners)) == 6  # 2 poison counts x 3 seeds: the taus share a baseline
    with pytest.raises(UserError, match="0 <= i < n"):
        sweep.parse_shard("4/4")
    assert sweep.parse_shard(" 1/4 ") == (1, 4)


def test_data_dirs_one_for_all_or_one_per_dataset():
    assert sweep.parse_data_dirs(None) is None and sweep.parse_data_dirs([]) is None
    assert sweep.parse_data_dirs(["../data/mnist"]) == "../data/mnist"
    assert sweep.parse_data_dirs(["mnist=a", "fashion_mnist=b"]) == {"mnist": "a", "fashion_mnist": "b"}
    with pytest.raises(UserError, match="NAME=DIR"):
        sweep.parse_data_dirs(["a", "b"])


def test_where_selects_runs_by_their_config_values():
    spec = sweep.expand({"cases": [{"case": "pixel"}, {"case": "bank", "defense.ci.filters": ["median3", "quant"]},
                                   {"case": "patch", "attack.name": "patch"}],
                         "grid": {TAU: [0.5, 1.0]}, "seeds": [0, 1, 2], "retrain_seeds": [0]})
    pick = lambda *items: [(r.varied["case"], r.varied[TAU], r.cfg.seed) for r in
                           sweep.select(spec.runs, sweep.parse_where(list(items)))]
    assert pick("attack.name=patch", "seed=0,2") == [("patch", 0.5, 0), ("patch", 1.0, 0), ("patch", 0.5, 2),
                                                     ("patch", 1.0, 2)]
    assert pick("defense.ci.filters=median3 quant", f"{TAU}=1") == [("bank", 1.0, s) for s in (0, 1, 2)]
    assert pick("defense.retrain=TRUE", f"{TAU}=0.5", "attack.name=pixel") == [("pixel", 0.5, 0), ("bank", 0.5, 0)]
    assert len(pick()) == 18
    for bad, msg in (("seed", "PATH=VALUE"), ("seed=", "PATH=VALUE"), ("defense.ci.tua=1", "did you mean 'defense.ci.tau'"),
                     ("seed=one", "expected")):
        with pytest.raises(UserError, match=msg):
            pick(bad)


def test_a_detection_only_row_stands_in_until_its_run_retrains(tmp_path):
    raw = {"grid": {TAU: [0.5]}, "seeds": [0, 1], "retrain_seeds": [0]}
    spec = sweep.expand(raw)
    detect = sweep.expand({**raw, "retrain_seeds": []})  # the detection-only pass of the same runs
    assert [r.detect_id for r in spec.runs] == [r.run_id for r in detect.runs]
    assert spec.runs[1].run_id == detect.runs[1].run_id  # seed 1 never retrains: one run
    row = lambda rid, seed, **m: {"run_id": rid, TAU: 0.5, "seed": seed, "tpr": 0.9, "fpr": 0.0, **m}
    rows = [row(detect.runs[0].run_id, 0), row(detect.runs[1].run_id, 1), row("other-spec", 0, tpr=0.1)]
    (tmp_path / "sweep.json").write_text(json.dumps({"spec": raw, "fields": [TAU], "summary_fields": [TAU],
                                                     "run_ids": [r.run_id for r in spec.runs],
                                                     "detect_ids": [r.detect_id for r in spec.runs]}))
    cols = ["run_id", TAU, "seed", *sweep.METRICS]
    sweep.write_rows(tmp_path / "results.csv", cols, rows)
    (entry,) = sweep.summarize(tmp_path)["rows"]
    assert entry["seeds"] == 2 and entry["tpr"] == (0.9, 0.0) and entry["asr_after"] is None
    sweep.write_rows(tmp_path / "results.csv", cols, rows + [row(spec.runs[0].run_id, 0, tpr=0.7, asr_after=0.02)])
    (entry,) = sweep.summarize(tmp_path)["rows"]
    # The sample std of 0.7 and 0.9: sqrt(2 * 0.1^2 / 1); asr_after has one value, so no spread.
    assert entry["seeds"] == 2 and np.allclose(entry["tpr"], (0.8, 0.1 * 2 ** 0.5)) and entry["asr_after"] == (0.02, None)


def test_python_spec(tmp_path):
    path = tmp_path / "spec.py"
    path.write_text("SPEC = {'grid': {'defense.ci.tau': [0.5, 1.0]}, 'seeds': [0]}\n")
    assert len(sweep.expand(sweep.read_spec(path)).runs) == 2
    path.write_text("SPEC = 3\n")
    with pytest.raises(UserError, match="SPEC"):
        sweep.read_spec(path)


@pytest.fixture(scope="module")
def full_sweep(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    spec_path = _spec_file(out.parent)
    sweep.run(spec_path, out, data_dir=data_dir)
    return out, spec_path


def test_sweep_shares_baselines_and_writes_summary(full_sweep):
    out, _ = full_sweep
    rows = _rows(out / "results.csv")
    assert len(rows) == 4 and len({r["run_id"] for r in rows}) == 4
    assert len([d for d in (out / "baselines").iterdir() if d.is_dir()]) == 2  # one per seed, both taus
    for r in rows:  # tau 1000 removes nothing; tau 0.5 removes at least what it flags
        if float(r[TAU]) == 1000.0:
            assert r["removed"] == "0" and r["clean_after"] == r["clean_before"]
    summary = (out / "summary.md").read_text()
    assert "| defense.ci.tau | seeds |" in summary and sum(l.startswith("|") for l in summary.splitlines()) == 4
    assert (out / "plots" / "defense.ci.tau.png").read_bytes().startswith(b"\x89PNG")


def test_a_sweep_piece_by_piece_gives_the_rows_of_the_whole(full_sweep, data_dir, tmp_path):
    out, spec_path = full_sweep
    whole = {r["run_id"]: r for r in _strip(_rows(out / "results.csv"))}
    for seed in ("1", "0"):  # the models are the whole sweep's: nothing trains again
        sweep.run(spec_path, tmp_path, data_dir=data_dir, models_dir=out, where={"seed": [seed]})
        rows = _strip(_rows(tmp_path / "results.csv"))
        assert all(r == whole[r["run_id"]] for r in rows)
        assert sorted(r["seed"] for r in rows) == (["1", "1"] if seed == "1" else ["0", "0", "1", "1"])
    by_tau = lambda d: {e[TAU]: {k: v for k, v in e.items() if k != "seconds"} for e in json.loads(
        (d / "summary.json").read_text())["rows"]}
    assert by_tau(tmp_path) == by_tau(out)


def test_every_dataset_is_loaded_before_any_run_trains(data_dir, tmp_path):
    spec = {"name": "two", "preset": "fast", "base": BASE, "seeds": [0],
            "cases": [{"data.dataset": "mnist"}, {"data.dataset": "fashion_mnist"}]}
    dirs = {"mnist": str(data_dir), "fashion_mnist": str(tmp_path / "nowhere")}
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        sweep.run(_spec_file(tmp_path, spec), tmp_path / "out", data_dir=dirs)
    assert not (tmp_path / "out" / "runs").exists() and not (tmp_path / "out" / "results.csv").exists()


def test_restart_skips_finished_runs(full_sweep, data_dir, monkeypatch):
    out, spec_path = full_sweep
    before = _rows(out / "results.csv")

    def boom(*args, **kwargs):
        raise AssertionError("a finished run was run again")
    monkeypatch.setattr(experiment, "run", boom)
    sweep.run(spec_path, out, data_dir=data_dir)
    assert _rows(out / "results.csv") == before


def test_two_shards_and_merge_equal_the_unsharded_sweep(full_sweep, data_dir, tmp_path):
    out, spec_path = full_sweep
    for i in range(2):
        sweep.run(spec_path, tmp_path, shard=(i, 2), data_dir=data_dir)
    assert not (tmp_path / "results.csv").exists()
    sweep.merge(tmp_path)
    assert _strip(_rows(tmp_path / "results.csv")) == _strip(_rows(out / "results.csv"))


@pytest.mark.timing
def test_sweep_killed_with_sigkill_resumes_with_every_run_once(data_dir, tmp_path):
    spec_path = _spec_file(tmp_path, {**SPEC, "grid": {TAU: [0.5, 2.0, 1000.0]}, "seeds": [0]})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ci_jax.cli", "sweep", str(spec_path), "--out", str(out),
           "--data-dir", str(data_dir)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    csv_path = out / "results.csv"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if csv_path.exists() and len(_rows(csv_path)) >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(_rows(csv_path))
    assert 1 <= n_before < 3
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = _rows(csv_path)
    assert len(rows) == 3 and len({r["run_id"] for r in rows}) == 3
    assert not list(out.rglob("*.tmp"))


def test_summary_draws_an_roc_per_attack_when_the_defense_varies(tmp_path):
    """A finished sweep's files, written by hand: two attacks (cases) x two defenses x two seeds."""
    import json

    import numpy as np

    from ci_jax import files

    runs, rows = [], []
    rng = np.random.default_rng(0)
    for case in ("pixel", "patch"):
        for defense in ("ci", "ss"):
            for seed in (0, 1):
                rid = f"{case}-{defense}-{seed}"
                is_poison = np.arange(50) < 10
                score = is_poison + rng.random(50) * (0.5 if defense == "ci" else 2.0)
                files.write_text(tmp_path / "runs" / rid / ".keep", "")
                np.savez(tmp_path / "runs" / rid / "defense.npz", score=score, poison_idx=np.flatnonzero(is_poison))
                runs.append(rid)
                rows.append({"run_id": rid, "case": case, "defense.name": defense, "seed": seed, "tpr": 0.9,
                             "fpr": 0.01, "clean_after": 0.99, "asr_after": 0.0})
    fields = ["case", "defense.name"]
    (tmp_path / "sweep.json").write_text(json.dumps({"spec": {}, "fields": fields, "summary_fields": fields,
                                                     "run_ids": runs}))
    sweep.write_rows(tmp_path / "results.csv", ["run_id", *fields, "seed", *sweep.METRICS], rows)
    summary = sweep.summarize(tmp_path)
    assert len(summary["rows"]) == 4 and all(r["seeds"] == 2 for r in summary["rows"])
    for case in ("pixel", "patch"):
        assert (tmp_path / "plots" / f"roc_case_{case}.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "plots" / "defense.name.png").is_file()
    assert "| case | defense.name | seeds |" in (tmp_path / "summary.md").read_text()


def test_cases_that_set_the_defense_get_one_roc_per_attack_with_a_curve_per_case(tmp_path, monkeypatch):
    from ci_jax import plots

    fields = ["case", "attack.name", "defense.name", "defense.ci.rule"]
    rows = []
    for case, defense, rule in (("pixel ci", "ci", "threshold"), ("pixel ci-test", "ci", "test"),
                                ("pixel ss", "ss", "threshold")):
        rid = case.replace(" ", "-")
        is_poison = np.arange(40) < 8
        (tmp_path / "runs" / rid).mkdir(parents=True)
        np.savez(tmp_path / "runs" / rid / "defense.npz", score=is_poison + 0.1 * np.arange(40),
                 poison_idx=np.flatnonzero(is_poison))
        rows.append({"run_id": rid, "case": case, "attack.name": "pixel", "defense.name": defense,
                     "defense.ci.rule": rule, "seed": 0, "tpr": 1.0})
    (tmp_path / "sweep.json").write_text(json.dumps({"spec": {}, "fields": fields, "summary_fields": ["case"],
                                                     "run_ids": [r["run_id"] for r in rows]}))
    sweep.write_rows(tmp_path / "results.csv", ["run_id", *fields, "seed", *sweep.METRICS], rows)
    drawn = {}
    monkeypatch.setattr(plots, "roc", lambda path, curves, title: drawn.__setitem__(path.name, sorted(curves)))
    sweep.summarize(tmp_path)
    assert drawn == {"roc_attack_name_pixel.png": ["pixel ci", "pixel ci-test", "pixel ss"]}


def test_summary_draws_an_attack_by_defense_grid_per_dataset(tmp_path, monkeypatch):
    from ci_jax import plots

    fields = ["case", "data.dataset", "attack.name", "defense.name"]
    rows = []
    for case, dataset, attack in (("mnist none", "mnist", "none"), ("mnist pixel", "mnist", "pixel"),
                                  ("fashion_mnist pixel", "fashion_mnist", "pixel")):
        for defense in ("ci", "ss"):
            for seed in (0, 1):
                poisons = attack != "none"
                rows.append({"run_id": f"{case}-{defense}-{seed}", "case": case, "data.dataset": dataset,
                             "attack.name": attack, "defense.name": defense, "seed": seed,
                             "tpr": (0.9 + 0.1 * seed) if poisons else "", "fpr": 0.01 * seed,
                             "asr_after": 0.02 if seed == 0 else ""})
    (tmp_path / "sweep.json").write_text(json.dumps({"spec": {}, "fields": fields,
                                                     "summary_fields": ["case", "defense.name"],
                                                     "run_ids": [r["run_id"] for r in rows]}))
    sweep.write_rows(tmp_path / "results.csv", ["run_id", *fields, "seed", *sweep.METRICS], rows)
    drawn = {}
    real = plots.defense_grid
    monkeypatch.setattr(plots, "defense_grid", lambda path, title, attacks, defenses, cells: (
        drawn.__setitem__(title, (attacks, defenses, cells)), real(path, title, attacks, defenses, cells)))
    monkeypatch.setattr(sweep, "_roc_per_attack", lambda *a: None)  # needs each run's defense.npz
    sweep.summarize(tmp_path)
    assert sorted(drawn) == ["fashion_mnist", "mnist"]
    attacks, defenses, cells = drawn["mnist"]
    assert attacks == ["none", "pixel"] and defenses == ["ci", "ss"]
    # Sample standard deviations over the two seeds: sqrt(2 * 0.05^2 / 1); one seed has no spread.
    assert np.allclose(cells[("pixel", "ci")]["tpr"], (0.95, 0.05 * 2 ** 0.5))
    assert cells[("pixel", "ci")]["asr_after"] == (0.02, None)
    assert cells[("none", "ss")]["tpr"] is None and np.allclose(cells[("none", "ss")]["fpr"], (0.005, 0.005 * 2 ** 0.5))
    assert drawn["fashion_mnist"][0] == ["pixel"]
    for name in ("mnist", "fashion_mnist"):
        assert (tmp_path / "plots" / f"grid_{name}.png").read_bytes().startswith(b"\x89PNG")


SPECS = sorted((Path(__file__).parents[1] / "experiments").rglob("*.yaml"))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_the_experiment_specs_expand(path):
    spec = sweep.expand(sweep.read_spec(path), where=str(path))
    assert spec.runs and all(f in config.PATHS or f in ("case", "defense") for f in spec.fields)


def test_the_filter_and_benchmark_specs_keep_their_meaning():
    root = Path(__file__).parents[1] / "experiments"
    filt = {r.varied["case"]: r.cfg.defense.ci for r in sweep.expand(sweep.read_spec(root / "sweeps" / "filter.yaml")).runs}
    assert filt["gaussian0.5"].filters == ("gaussian",) and filt["gaussian0.5"].gaussian_sigma == 0.5
    assert filt["noise0.3"].filters == ("noise",) and filt["noise0.3"].noise_width == 0.3
    assert filt["mean2"].filters == ("mean2",)
    bench = sweep.expand(sweep.read_spec(root / "benchmark_defenses.yaml")).runs
    assert len(bench) == 4 * 3 * 3 and {r.cfg.train.batch_size for r in bench} == {32}
    none = [r.cfg for r in bench if r.varied["case"] == "none"]
    assert all(c.attack.name == "pixel" and c.attack.n_poison == 0 for c in none)
    assert {r.cfg.defense.name for r in bench} == {"ci", "ac", "ss"}


# -- flags that must not guess -------------------------------------------------------------------
GRID_SPEC = {"name": "flags", "preset": "fast", "base": BASE, "grid": {"defense.name": ["ci", "ss"], TAU: [0.5, 1.0]},
             "seeds": [0, 1]}


def _one_error_line(capsys, argv):
    capsys.readouterr()
    from ci_jax import cli

    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    if lines and ": backend " in lines[0] and lines[0].startswith("ci-jax "):
        lines = lines[1:]  # the start-up line, which the sweep's checks follow
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("ci-jax: error: "), err
    return lines[0]


@pytest.mark.parametrize("where,match", [
    (["seed=banana"], "--where seed=banana: expected an int"),
    (["defense.name=sss"], r"no run of the spec has it\): 'sss': did you mean 'ss'\? \(choose one of ci, ss\)"),
    (["defense.name=ac"], r"'ac': \(choose one of ci, ss\)"),  # a defense, but not one of this spec
    (["seed=0,7"], r"seed value .*'7'.*choose one of 0, 1"),  # one value of two is a typo
    ([f"{TAU}=0.7"], r"choose one of 0.5, 1.0"),
    (["train.epochs=3"], r"choose one of 1\)"),  # a path the spec does not vary: the one value it has
    (["defense.ci.tua=1"], "did you mean 'defense.ci.tau'"),
])
def test_a_where_that_picks_no_run_is_an_error_before_anything_is_written(tmp_path, capsys, where, match):
    out = tmp_path / "out"
    err = _one_error_line(capsys, ["sweep", str(_spec_file(tmp_path, GRID_SPEC)), "--out", str(out), "--where", *where])
    assert re.search(match, err), err
    assert not out.exists()


def test_where_values_that_exist_but_never_together_are_an_error(tmp_path):
    spec = {**GRID_SPEC, "cases": [{"case": "pixel"}, {"case": "patch", "attack.name": "patch"}], "retrain_seeds": [0]}
    with pytest.raises(UserError, match="no run has them all together"):
        sweep.run(_spec_file(tmp_path, spec), tmp_path / "out", where={"attack.name": ["patch"], "seed": ["1"],
                                                                       "defense.retrain": ["true"]})
    assert not (tmp_path / "out").exists()
    assert sweep.check_where(sweep.expand(spec).runs, {"attack.name": ["patch"], "seed": ["0"]}) is None


def test_data_dir_names_must_be_datasets_of_the_sweep(tmp_path, capsys):
    known = r"\(choose one of mnist, fashion_mnist, cifar10, cifar100, gtsrb\)"
    with pytest.raises(UserError, match=r"unknown dataset in --data-dir 'foo': " + known):
        sweep.parse_data_dirs(["foo=/data/foo"])
    with pytest.raises(UserError, match="mnist is given twice"):
        sweep.parse_data_dirs(["mnist=a", "mnist=b"])
    out = tmp_path / "out"
    err = _one_error_line(capsys, ["sweep", str(_spec_file(tmp_path, GRID_SPEC)), "--out", str(out),
                                   "--data-dir", "mnist=a", "fashion_mnist=b"])
    assert "no run of the sweep uses it): 'fashion_mnist': (choose one of mnist)" in err
    assert not out.exists()


def test_shard_is_bounded_by_the_baselines_and_a_million(tmp_path, capsys):
    for bad in ("99999999999999999999999/99999999999999999999999", "0/1000001", "-1/4", "1/1", "0/0",
                "0/" + "9" * 5000):
        with pytest.raises(UserError, match="0 <= i < n <= 1000000"):
            sweep.parse_shard(bad)
    assert sweep.parse_shard("999999/1000000") == (999999, 1000000)
    out = tmp_path / "out"  # GRID_SPEC: two seeds, one baseline each (the defense and tau change no model)
    err = _one_error_line(capsys, ["sweep", str(_spec_file(tmp_path, GRID_SPEC)), "--out", str(out), "--shard", "2/3"])
    assert "the spec has 2 baseline(s)" in err and "1 of 3 shards would run nothing: use N <= 2" in err
    assert not out.exists()


# -- damaged sweep directories ---------------------------------------------------------------------
def _damage(raw: bytes, rng) -> list[tuple[str, bytes]]:
    """Ways a file breaks: cut short, a bit flipped, random bytes, empty, JSON for CSV and back."""
    cases = [("empty", b""), ("json list", b"[]"), ("json object", b"{}"), ("json null", b"null"),
             ("random", rng.bytes(200)), ("NUL", b"run_id\x00,seed\n")]
    for _ in range(4):
        cut = int(rng.integers(1, len(raw)))
        cases.append((f"truncated at {cut}", raw[:cut]))
    for _ in range(8):
        pos, bit = int(rng.integers(len(raw))), int(rng.integers(8))
        flipped = bytearray(raw)
        flipped[pos] ^= 1 << bit
        cases.append((f"bit {bit} of byte {pos} flipped", bytes(flipped)))
    return cases


def _copy_sweep(src: Path, dst: Path) -> None:
    dst.mkdir()
    for name in ("sweep.json", "results.csv", "summary.json"):
        shutil.copy(src / name, dst / name)
    shutil.copytree(src / "runs", dst / "runs")


def _reports(d: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted((d / "runs").glob("*/report.json"))}


def _same_results(d: Path, out: Path, run_ids) -> None:
    """Every run's row exactly as the undamaged sweep wrote it, and the same summary."""
    by_id = {r["run_id"]: r for r in _rows(d / "results.csv")}
    assert [by_id.get(i) for i in run_ids] == _rows(out / "results.csv")
    assert json.loads((d / "summary.json").read_text()) == json.loads((out / "summary.json").read_text())


@pytest.fixture
def no_rerun(monkeypatch):
    """Every run of the fixture sweep has its report: a damaged table must not train anything."""
    from ci_jax import experiment

    monkeypatch.setattr(experiment, "run", lambda *a, **k: pytest.fail("a finished run ran again"))


@pytest.fixture
def no_figures(monkeypatch):
    """The damage tests merge dozens of times: the summary's figures (drawn and checked by the tests
    of the summary) are left undrawn, which was most of their time."""
    from ci_jax import plots

    for name in ("sweep_field", "roc", "defense_grid"):
        monkeypatch.setattr(plots, name, lambda *a, **k: None)


def test_a_damaged_results_csv_is_rebuilt_from_the_reports(full_sweep, tmp_path, no_rerun, no_figures):
    out, spec_path = full_sweep
    run_ids = [r["run_id"] for r in _rows(out / "results.csv")]
    raw = (out / "results.csv").read_bytes()
    rng = np.random.default_rng(21)
    cases = _damage(raw, rng) + [("no run_id column", raw.replace(b"run_id", b"run", 1)),
                                 ("a cell that is no number", raw.replace(b",0.", b",0.x", 1))]
    for k, (what, bad) in enumerate(cases):
        d = tmp_path / str(k)
        _copy_sweep(out, d)
        (d / "results.csv").write_bytes(bad)
        (d / "sweep.json").write_bytes(bad)  # the sweep writes it from the spec: never read back
        reports = _reports(d)
        sweep.run(spec_path, d)
        _same_results(d, out, run_ids)
        assert _reports(d) == reports, what
        aside = list(d.glob("results.csv.damaged*"))
        assert not aside or aside[0].read_bytes() == bad, what  # what the damaged file held is kept
    assert len(list(tmp_path.glob("*/results.csv.damaged"))) >= len(cases) - 8  # every damage but some flips was seen


def _sharded(out: Path, spec_path: Path, d: Path) -> None:
    """The fixture sweep as two shards would leave it, before `merge`."""
    _copy_sweep(out, d)
    rows = _rows(out / "results.csv")
    spec = sweep.expand(sweep.read_spec(spec_path))
    cols = sweep.columns(spec)
    for i in range(2):
        mine = {r.run_id for r in sweep.shard_runs(spec.runs, i, 2)}
        sweep.write_rows(d / f"results-{i}-of-2.csv", cols, [r for r in rows if r["run_id"] in mine])
    (d / "results.csv").unlink()
    (d / "summary.json").unlink()


def test_merge_of_damaged_files_gives_the_same_results_or_one_error_line(full_sweep, tmp_path, capsys, no_figures):
    from ci_jax import cli

    out, spec_path = full_sweep
    run_ids = [r["run_id"] for r in _rows(out / "results.csv")]
    _sharded(out, spec_path, tmp_path / "clean")
    rng = np.random.default_rng(7)
    meta = json.loads((out / "sweep.json").read_text())
    other_types = [("sweep.json", json.dumps(v).encode()) for v in
                   ([], {}, "sweep", 3, None, {**meta, "run_ids": 5}, {**meta, "fields": [1]},
                    {**meta, "detect_ids": meta["run_ids"][:1]}, {**meta, "spec": []},
                    {**meta, "spec": {**meta["spec"], "seeds": [0, 2]}}, {**meta, "run_ids": meta["run_ids"][::-1]})]
    cases = other_types + [(name, bad) for name in ("sweep.json", "results-0-of-2.csv", "results-1-of-2.csv")
                           for _, bad in _damage((tmp_path / "clean" / name).read_bytes(), rng)]
    errors = 0
    for k, (name, bad) in enumerate(cases):
        d = tmp_path / str(k)
        shutil.copytree(tmp_path / "clean", d)
        (d / name).write_bytes(bad)
        reports = _reports(d)
        capsys.readouterr()
        rc = cli.main(["merge", str(d)])
        err = capsys.readouterr().err
        assert _reports(d) == reports
        if rc == 0:
            _same_results(d, out, run_ids)
            aside = list(d.glob(f"{name}.damaged*"))
            assert not aside or aside[0].read_bytes() == bad
        else:  # only sweep.json, which nothing else can rebuild, may stop a merge
            lines = err.splitlines()
            assert rc == 2 and name == "sweep.json" and len(lines) == 1, (name, bad, err)
            assert lines[0].startswith(f"ci-jax: error: {d / 'sweep.json'}") and "ci-jax sweep SPEC" in lines[0], err
            assert not (d / "results.csv").exists()  # nothing written before the error
            errors += 1
    assert errors >= len(other_types)


def test_a_damaged_report_leaves_the_row_and_a_lost_row_reruns_only_its_run(full_sweep, data_dir, tmp_path,
                                                                            monkeypatch):
    from ci_jax import experiment

    out, spec_path = full_sweep
    rows = _rows(out / "results.csv")
    d = tmp_path / "d"
    _copy_sweep(out, d)
    victim = rows[1]["run_id"]
    (d / "runs" / victim / "report.json").write_bytes(b'{"config": [')
    ran = []
    monkeypatch.setattr(experiment, "run", lambda cfg, run_dir, **k: pytest.fail(f"{Path(run_dir).name} ran"))
    sweep.run(spec_path, d)  # the CSV still has the row: nothing runs
    assert ran == [] and _rows(d / "results.csv") == rows
    (d / "results.csv").write_bytes(b"\xff" * 10)  # and now the row is gone too: that run, and only it, runs again
    report = Report.from_json(json.loads((out / "runs" / victim / "report.json").read_text()))
    monkeypatch.setattr(experiment, "run", lambda cfg, run_dir, **k: ran.append(Path(run_dir).name) or report)
    sweep.run(spec_path, d, data_dir=data_dir)
    assert ran == [victim]
    assert {r["run_id"]: r for r in _rows(d / "results.csv")} == {r["run_id"]: r for r in rows}


def test_a_missing_or_damaged_defense_npz_leaves_its_run_out_of_the_roc(tmp_path, monkeypatch):
    from ci_jax import plots

    fields = ["defense.name"]
    rows = []
    for defense in ("ci", "ss"):
        for seed in (0, 1):
            rid = f"{defense}-{seed}"
            is_poison = np.arange(40) < 8
            (tmp_path / "runs" / rid).mkdir(parents=True)
            np.savez(tmp_path / "runs" / rid / "defense.npz", score=10 * is_poison + 0.1 * np.arange(40),
                     poison_idx=np.flatnonzero(is_poison))  # every poison above every clean image: AUC 1
            rows.append({"run_id": rid, "defense.name": defense, "seed": seed, "tpr": 1.0, "fpr": 0.0})
    (tmp_path / "runs" / "ci-0" / "defense.npz").write_bytes(b"PK\x03\x04 not a zip")
    np.savez(tmp_path / "runs" / "ci-1" / "defense.npz", score=np.ones(40), poison_idx=np.array([40]))  # out of range
    (tmp_path / "runs" / "ss-0" / "defense.npz").unlink()
    (tmp_path / "sweep.json").write_text(json.dumps({"spec": {}, "fields": fields, "summary_fields": fields,
                                                     "run_ids": [r["run_id"] for r in rows]}))
    sweep.write_rows(tmp_path / "results.csv", ["run_id", *fields, "seed", *sweep.METRICS], rows)
    drawn = {}
    monkeypatch.setattr(plots, "roc", lambda path, curves, title: drawn.update(curves))
    assert len(sweep.summarize(tmp_path)["rows"]) == 2
    assert list(drawn) == ["ss"] and drawn["ss"][2] == 1.0  # ci has no sound file left; ss has seed 1's


@pytest.mark.parametrize("text,reason", [
    (b"run_id,seed,tpr\nab,0,0.5\nc", "line 3 has 1 cells, the header 3"),  # cut short in a row
    (b"run_id,seed,tpr\nab,0,0.5x\n", "line 2: tpr '0.5x' is not a number"),
    (b"run_id,seed,tpr\nab,0.5,0.5\n", "line 2: seed '0.5' is not a number"),
    (b"run_id,tpr,tpr\n", "a column is named twice"),
    (b"run,seed\n", "no column run_id"),
    (b"run_id,seed\n\xffab,0\n", "not UTF-8 text (bad byte at offset 12)"),
    (b"run_id,seed\n\"ab,0\n", "line 2 has 1 cells, the header 2"),  # a quote never closed
    (b"run_id,seed\nab," + b"1" * 200_000 + b"\n", "not CSV: field larger than field limit (131072)"),
    (b"", "no header line"),
])
def test_read_rows_names_the_damage(tmp_path, text, reason):
    (tmp_path / "r.csv").write_bytes(text)
    with pytest.raises(sweep.Damaged) as e:
        sweep.read_rows(tmp_path / "r.csv")
    assert str(e.value) == reason
    assert sweep.read_rows(tmp_path / "none.csv") == []
    with pytest.raises(UserError, match="cannot read"):  # a directory where the CSV should be is no damage to rebuild
        sweep.read_rows(tmp_path)


def test_the_summary_shows_the_spread_over_seeds_only_where_there_are_several():
    rows = [{"attack.name": "pixel", "seed": s, **{m: "" for m in sweep.METRICS}} for s in ("0", "1")]
    rows[0].update(tpr="0.5", auc="0.8")
    rows[1].update(tpr="0.7", auc="0.9")
    rows.append({"attack.name": "patch", "seed": "0", **{m: "" for m in sweep.METRICS}, "tpr": "0.25"})
    table = sweep.aggregate(rows, ["attack.name"])
    pixel, patch = table
    assert pixel["seeds"] == 2 and pixel["tpr"][0] == pytest.approx(0.6)
    assert pixel["tpr"][1] == pytest.approx(0.1414213562)  # sample std: sqrt(((0.1)^2 + (0.1)^2) / 1)
    assert patch["tpr"] == (0.25, None) and patch["auc"] is None
    md = sweep.markdown(table, ["attack.name"]).splitlines()
    assert "| 60.00 ± 14.14 % |" in md[2] and "| 0.8500 ± 0.0707 |" in md[2]
    assert "| 25.00 % |" in md[3] and "±" not in md[3].split("| 1 |", 1)[1]
