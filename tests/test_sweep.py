"""Sweeps on a tiny synthetic MNIST: expansion, sharing, restart after kill -9, shards + merge."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from ci_jax import config, sweep
from ci_jax.errors import UserError

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
    assert entry["seeds"] == 2 and np.allclose(entry["tpr"], (0.8, 0.1)) and entry["asr_after"] == (0.02, 0.0)


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
    assert "| defense.ci.tau | seeds |" in summary and summary.count("\n") == 4
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


def test_restart_skips_finished_runs(full_sweep, data_dir):
    out, spec_path = full_sweep
    before = _rows(out / "results.csv")
    t0 = time.perf_counter()
    sweep.run(spec_path, out, data_dir=data_dir)
    assert _rows(out / "results.csv") == before
    assert time.perf_counter() - t0 < 30  # nothing trained: just the data and the summary


def test_two_shards_and_merge_equal_the_unsharded_sweep(full_sweep, data_dir, tmp_path):
    out, spec_path = full_sweep
    for i in range(2):
        sweep.run(spec_path, tmp_path, shard=(i, 2), data_dir=data_dir)
    assert not (tmp_path / "results.csv").exists()
    sweep.merge(tmp_path)
    assert _strip(_rows(tmp_path / "results.csv")) == _strip(_rows(out / "results.csv"))


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
    assert np.allclose(cells[("pixel", "ci")]["tpr"], (0.95, 0.05)) and cells[("pixel", "ci")]["asr_after"] == (0.02, 0.0)
    assert cells[("none", "ss")]["tpr"] is None and np.allclose(cells[("none", "ss")]["fpr"], (0.005, 0.005))
    assert drawn["fashion_mnist"][0] == ["pixel"]
    for name in ("mnist", "fashion_mnist"):
        assert (tmp_path / "plots" / f"grid_{name}.png").read_bytes().startswith(b"\x89PNG")


SPECS = sorted((Path(__file__).parents[1] / "experiments").rglob("*.yaml"))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_the_experiment_specs_expand(path):
    spec = sweep.expand(sweep.read_spec(path), where=str(path))
    assert spec.runs and all(f in config.PATHS or f == "case" for f in spec.fields)


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
