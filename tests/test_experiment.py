"""End to end on a small synthetic task: the planted trigger must be learned, found and removed;
reruns over a finished run (other data, damaged caches, interruptions) give the same report or one
error line."""

import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from ci_jax import cli, config, data, experiment, files, train
from ci_jax.errors import UserError
from ci_jax.report import Report

from helpers import make_cfg, run_cli, without_timings

pytestmark = pytest.mark.slow  # every test here trains models or reruns a trained one

# diag: with ~200 images a class, full 128-D covariances cost BIC too much to ever split a class.
CFG = {"train.epochs": 3, "train.batch_size": 32, "eval.batch_size": 128, "attack.n_poison": 60,
       "attack.pixel.amplitude": 1.0, "defense.ci.k_max": 4, "defense.ci.covariance": "diag"}


def _cfg(**overrides):
    """The fast preset with CFG and overrides (keywords: `__` for the dots)."""
    return make_cfg(CFG, **overrides)


@pytest.fixture(scope="module")
def other_ds(synthetic_data):
    """Another task of ds's size (ds: conftest.py)."""
    return synthetic_data(1500, 500, seed=1)


@pytest.fixture(scope="module")
def first_run(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, experiment.run(_cfg(), out, dataset=ds).to_json()


def test_trigger_found_and_removed(first_run):
    out, report = first_run
    assert report["baseline"]["clean_acc"] > 0.9
    assert report["baseline"]["asr"] > 0.9
    d = report["defense"]
    assert d["tpr"] >= 0.95 and d["fpr"] <= 0.01 and d["auc"] > 0.95
    assert report["retrained"]["asr"] < 0.1
    assert report["retrained"]["clean_acc"] > 0.9
    target = next(c for c in d["ci"]["classes"] if c["label"] == 2)  # CI's own section, under its name
    assert target["k"] >= 2 and any(c["flagged"] and c["poisons"] > 50 for c in target["components"])
    assert d["name"] == "ci" and d["ci"]["filters"] == ["median3"] and d["ci"]["rule"] == "threshold"
    assert d["poisons"] == 60 and d["removed_poisons"] == round(d["tpr"] * 60)
    assert d["removed"] == d["removed_poisons"] + d["removed_clean"] and d["clean_images"] == 1440
    assert d["covers"] == d["removed_covers"] == 0 and sum(d["removed_per_class"].values()) == d["removed"]


def test_report_says_what_was_measured_on_what(first_run, ds):
    _, report = first_run
    assert report["attack"] == {"name": "pixel", "poisons": 60, "covers": 0, "clean_label": False,
                                "asr_measured_on": "test images of class 0, triggered",
                                "asr_images": int((ds.y_test == 0).sum())}
    assert report["data"] == {"dataset": "synthetic", "sha256": ds.sha256, "train_images": 1500,
                              "test_images_scored": 500, "reserve_images": 0}
    assert report["config"] == config.to_dict(_cfg())
    assert report["baseline"]["checkpoint"] == "baseline" and report["retrained"]["checkpoint"] == "retrained"
    assert 0 <= report["baseline"]["target_rate_untriggered"] < 0.1  # the trigger, not the images, does it
    assert set(report["defense"]["timings_s"]) == {"gmm", "filtered_passes", "impurity"}
    assert report["device"]["platform"] == "cpu"
    lines = cli.summary(Report.from_json(report), "x/report.json").splitlines()
    assert len(lines) == 4 and lines[1].startswith("defense    ci removed") and lines[-1].endswith("-> x/report.json")


def test_each_epoch_logs_clean_accuracy_and_asr_on_the_fixed_subset(first_run, ds):
    out, report = first_run
    for model in ("baseline", "retrained"):
        epochs = [e for e in train.read_log(out / model) if "mean_loss" in e]
        assert [e["epoch"] for e in epochs] == list(range(_cfg().train.epochs))
        assert all(0.0 <= e["clean_acc"] <= 1.0 and 0.0 <= e["asr"] <= 1.0 for e in epochs)
    # The subset covers every scored test image here (500 < 1000), so the last epoch's figures
    # are the report's.
    last = [e for e in train.read_log(out / "baseline") if "mean_loss" in e][-1]
    assert (last["clean_acc"], last["asr"]) == (report["baseline"]["clean_acc"], report["baseline"]["asr"])


def test_run_directory(first_run):
    out, report = first_run
    assert json.loads((out / "report.json").read_text()) == report
    assert json.loads((out / "config.json").read_text())["attack"]["n_poison"] == 60
    assert config.from_dict(json.loads((out / "config.json").read_text())) == _cfg()
    for name in ("examples", "bic", "impurity", "roc", "loss"):
        assert (out / "plots" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "baseline" / "done.json").exists() and (out / "retrained" / "done.json").exists()
    # What the baseline's passes and the defense computed is kept beside it.
    for name in ("passes.npz", "pass-median3.npz", "gmm.json", "metrics.jsonl", "key.json"):
        assert (out / "baseline" / name).is_file(), name
    assert (out / "retrained" / "eval.npz").is_file() and (out / "retrained" / "metrics.jsonl").is_file()
    assert set(report["timings_s"]) == {"data", "train_baseline", "features", "evaluate", "defense", "retrain",
                                       "total"}
    assert not list(out.rglob("*.tmp"))
    with np.load(out / "defense.npz") as z:
        assert set(z.files) == {"score", "removed_idx", "poison_idx", "cover_idx", "reserve_idx"}
        assert len(z["removed_idx"]) == report["defense"]["removed"]
        assert z["score"].shape == (1500,)
        assert len(z["poison_idx"]) == 60 and len(z["cover_idx"]) == len(z["reserve_idx"]) == 0
        assert set(z["poison_idx"]) <= set(z["removed_idx"]) or report["defense"]["tpr"] < 1


def test_rerun_reuses_checkpoints_and_is_identical(first_run, ds):
    out, report = first_run
    again = experiment.run(_cfg(), out, dataset=ds).to_json()
    assert again["timings_s"]["train_baseline"] == 0.0 and again["timings_s"]["retrain"] == 0.0
    assert without_timings(again) == without_timings(report)


def test_defense_change_reuses_baseline(first_run, ds, tmp_path):
    out, report = first_run
    changed = experiment.run(_cfg(defense__ci__filters=["mean3"], defense__ci__tau=0.3), out, dataset=ds,
                             make_plots=False).to_json()
    assert changed["timings_s"]["train_baseline"] == 0.0 and changed["timings_s"]["features"] == 0.0
    assert changed["baseline"] == report["baseline"]
    assert changed["config"]["defense"]["ci"]["filters"] == ["mean3"]
    assert changed["defense"]["ci"]["filters"] == ["mean3"]
    assert (out / "baseline" / "pass-mean3.npz").is_file()  # beside the median's
    assert not (out / "plots").exists()  # the previous run's figures went with its report


def test_another_defense_on_the_same_baseline(first_run, ds, tmp_path):
    out, report = first_run
    ss = experiment.run(_cfg(defense__name="ss", defense__retrain=False), tmp_path / "ss", dataset=ds,
                        make_plots=False, baseline_from=out).to_json()
    assert ss["timings_s"]["train_baseline"] == 0.0
    assert ss["defense"]["name"] == "ss" and set(ss["defense"]["timings_s"]) == {"scoring"}
    assert ss["defense"]["removed"] == sum(c["removed"] for c in ss["defense"]["ss"]["classes"])
    assert ss["retrained"] == {"skipped": True, "clean_acc": None, "asr": None}
    assert ss["timings_s"]["retrain"] == 0.0 and not (tmp_path / "ss" / "retrained").exists()


def test_a_reserve_is_held_out_of_accuracy_and_asr(first_run, ds, tmp_path):
    out, report = first_run
    held = experiment.run(_cfg(eval__reserve=100, defense__retrain=False), tmp_path / "held", dataset=ds,
                          make_plots=False, baseline_from=out).to_json()
    assert held["timings_s"]["train_baseline"] == 0.0  # eval settings change no model
    assert held["data"]["reserve_images"] == 100 and held["data"]["test_images_scored"] == 400
    with np.load(tmp_path / "held" / "defense.npz") as z:
        reserve = z["reserve_idx"]
    assert len(reserve) == len(set(reserve)) == 100 and np.all(np.diff(reserve) > 0)
    p = experiment.prepare(_cfg(eval__reserve=100), ds)
    np.testing.assert_array_equal(p.reserve_idx, reserve)
    assert not p.scored_N[reserve].any() and p.scored_N.sum() == 400
    assert held["attack"]["asr_images"] == int(p.scored_N[p.triggered.idx].sum())


def test_same_seed_same_report_in_a_fresh_directory(first_run, ds, tmp_path):
    _, report = first_run
    fresh = experiment.run(_cfg(), tmp_path / "fresh", dataset=ds, make_plots=False).to_json()
    assert without_timings(fresh) == without_timings(report)


def test_baseline_from_another_run(first_run, ds, tmp_path):
    out, report = first_run
    other = experiment.run(_cfg(defense__ci__tau=0.3), tmp_path / "ablation", dataset=ds,
                           make_plots=False, baseline_from=out).to_json()
    assert other["timings_s"]["train_baseline"] == 0.0
    assert other["baseline"]["clean_acc"] == report["baseline"]["clean_acc"]
    assert not (tmp_path / "ablation" / "baseline").exists()
    assert other["baseline"]["checkpoint"] == os.path.relpath(out / "baseline", tmp_path / "ablation")


def test_baseline_from_writes_nothing_into_the_other_run(first_run, ds, tmp_path):
    # Its caches (a new defense's result, a new filter's pass) go to this run's caches/; the other
    # run's are read.
    out, _ = first_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    other = experiment.run(_cfg(defense__ci__filters=["mean2"], defense__retrain=False), tmp_path / "abl",
                           dataset=ds, make_plots=False, baseline_from=out).to_json()
    assert other["timings_s"]["features"] == 0.0  # the other run's passes.npz, read
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    kept = {p.name for p in (tmp_path / "abl" / "caches").iterdir()}
    assert "pass-mean2.npz" in kept and any(n.startswith("defense-ci-") for n in kept)
    again = experiment.run(_cfg(defense__ci__filters=["mean2"], defense__retrain=False), tmp_path / "abl",
                           dataset=ds, make_plots=False, baseline_from=out).to_json()
    assert again["defense"]["timings_s"] == {}  # the result cached in caches/ is reused


def test_baseline_from_a_run_with_other_training_is_refused(first_run, ds, other_ds, tmp_path):
    out, _ = first_run
    with pytest.raises(UserError, match=r"its baseline was trained otherwise \(train.lr differ\)"):
        experiment.run(_cfg(train__lr=0.01), tmp_path / "x", dataset=ds, baseline_from=out).to_json()
    with pytest.raises(UserError, match="trained on other data"):
        experiment.run(_cfg(), tmp_path / "y", dataset=other_ds, baseline_from=out).to_json()
    with pytest.raises(UserError, match="no finished baseline there"):
        experiment.run(_cfg(), tmp_path / "z", dataset=ds, baseline_from=tmp_path / "nowhere").to_json()


def test_a_run_directory_of_the_flat_config_is_refused(first_run, ds, tmp_path):
    old = tmp_path / "old"
    (old / "baseline").mkdir(parents=True)
    (old / "baseline" / "done.json").write_text('{"key": "abc", "epochs": 3}')
    (old / "config.json").write_text(json.dumps({"trigger": "pixel", "n_poison": 60, "tau": 0.5}))
    with pytest.raises(UserError, match="older ci-jax.*rerun into a new directory"):
        experiment.finished_baseline(old, _cfg(), "abc")


def test_prepare_checks_everything_before_any_work(ds):
    p = experiment.prepare(_cfg(), ds)
    assert p.model_key == config.model_key(_cfg(), ds.sha256)
    assert p.poisoned.n_poison == 60 and p.triggered.x_NHWC.shape[0] == int((ds.y_test == 0).sum())
    assert p.scored_N.all() and p.reserve_idx.size == 0
    assert p.model_key == experiment.prepare(_cfg(defense__ci__tau=3.0, eval__batch_size=64), ds).model_key
    with pytest.raises(UserError, match="holds out the whole 500-image test split"):
        experiment.prepare(_cfg(eval__reserve=500), ds)
    with pytest.raises(UserError, match="gaussian_sigma"):
        experiment.prepare(_cfg(defense__ci__filters=["gaussian"], defense__ci__gaussian_sigma=8.0), ds)
    with pytest.raises(UserError, match="--train.batch_size = 2048 is larger than the 1500 images"):
        experiment.prepare(_cfg(train__batch_size=2048), ds)


def test_nothing_removed_reuses_the_baseline_as_the_retrained_model(ds, tmp_path):
    report = experiment.run(_cfg(attack__n_poison=0), tmp_path / "clean", dataset=ds, make_plots=False).to_json()
    assert report["defense"]["removed"] == 0
    assert report["retrained"] == {**report["baseline"], "checkpoint": "baseline"}
    assert report["timings_s"]["retrain"] == 0.0
    assert not (tmp_path / "clean" / "retrained").exists()


# -- kill -9 and resume -------------------------------------------------------------------------
RESUME_ARGS = ["--preset", "fast", "--train.epochs", "2", "--train.batch_size", "32", "--eval.batch_size", "128",
               "--attack.n_poison", "20", "--attack.pixel.amplitude", "1.0", "--defense.ci.k_max", "3",
               "--defense.ci.covariance", "diag", "--defense.ci.tau", "0.05", "--no-plots"]


def _cli(out, data_dir, kill_at=None):
    """The CLI in its own process group, as a scheduler runs a job; a killed run's leftover
    workers (joblib's) are killed with the group, as a pre-empted job's are."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "CI_JAX_KILL_AT"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    if kill_at:
        env["CI_JAX_KILL_AT"] = kill_at
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ci_jax.cli", "run", "--data-dir", str(data_dir),
                                 "--out", str(out), *RESUME_ARGS], env=env, stdout=log, stderr=log,
                                start_new_session=True)
        try:
            proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, "", log.read())


@pytest.fixture(scope="module")
def uninterrupted(mnist_like_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    proc = _cli(out, mnist_like_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["defense"]["removed"] > 0  # so that the retraining stage exists to be killed
    return report


@pytest.mark.timing
def test_a_run_killed_at_every_stage_in_turn_resumes_to_the_same_report(uninterrupted, mnist_like_dir, tmp_path):
    """Killed (SIGKILL, as a pre-empted job) at each stage in turn, every process resuming what the
    one before it left, the run ends with the uninterrupted run's report. One chain, not a fresh run
    per stage: each resumption also starts from a resumed run's files."""
    done = tmp_path / "baseline" / "done.json"
    for kill_at in ("baseline-epoch", "gmm", "retrain-epoch", "write:report.json"):
        killed = _cli(tmp_path, mnist_like_dir, kill_at)
        assert killed.returncode == -9, (kill_at, killed.stderr[-2000:])
        assert not (tmp_path / "report.json").exists(), kill_at
        if kill_at == "gmm":  # the baseline was finished before this kill: later processes reuse it
            finished = (done.read_bytes(), done.stat().st_mtime_ns)
    resumed = _cli(tmp_path, mnist_like_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert without_timings(report) == without_timings(uninterrupted)
    assert (done.read_bytes(), done.stat().st_mtime_ns) == finished and report["timings_s"]["train_baseline"] == 0.0
    assert not list(tmp_path.rglob("*.tmp"))


def test_damaged_baseline_checkpoint_is_an_error_before_anything_is_written(first_run, ds, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(first_run[0], out)
    step = out / "baseline" / "orbax" / "3"
    biggest = max((p for p in step.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100])
    for name in ("config.json", "provenance.json", "report.json"):
        (out / name).unlink()
    with pytest.raises(UserError, match="baseline"):
        experiment.run(_cfg(), out, dataset=ds).to_json()
    assert not any((out / name).exists() for name in ("config.json", "provenance.json", "report.json"))


def test_the_report_reads_back_as_written_and_a_defense_cannot_overwrite_a_metric(first_run):
    _, report = first_run
    typed = Report.from_json(json.loads(json.dumps(report)))  # as written, as read back
    assert typed.to_json() == report
    assert typed.defense.detection.tpr == report["defense"]["tpr"] and typed.defense.own["rule"] == "threshold"
    # A defense whose own report had a key named like a metric would have overwritten it when the
    # two were merged flat: its own section now sits under its name.
    clash = dataclasses.replace(typed.defense, own={"tpr": "mine", "removed": -1})
    as_json = clash.to_json()
    assert as_json["tpr"] == report["defense"]["tpr"] and as_json["ci"] == {"tpr": "mine", "removed": -1}
    with pytest.raises(UserError, match="not a report of this ci-jax"):
        Report.from_json({**report, "defense": {"name": "ci"}})
    # ci-jax 0.2 merged the defense's own keys in flat: such a report reads back in today's layout.
    flat = {**report, "defense": {k: v for k, v in report["defense"].items() if k != "ci"} | report["defense"]["ci"]}
    assert Report.from_json(flat).to_json() == report


# -- reruns over a finished run: other data, damaged caches and logs, interruptions, locks ----------

# A second finished run, of two epochs and 40 poisons, that the tests below copy and rerun over.
RERUN_CFG = {"train.epochs": 2, "train.batch_size": 32, "eval.batch_size": 128, "attack.n_poison": 40,
             "attack.pixel.amplitude": 1.0, "defense.ci.k_max": 3, "defense.ci.covariance": "diag",
             "defense.ci.tau": 0.05}


def _rerun_cfg(**kw):
    return make_cfg(RERUN_CFG, **kw)


@pytest.fixture(scope="module")
def finished(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    return out, experiment.run(_rerun_cfg(), out, dataset=ds, make_plots=False).to_json()


# -- 1: other data never reuses the old model ------------------------------------------------------
def test_rerun_on_other_data_trains_anew_and_reports_the_new_data(finished, ds, other_ds, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    again = experiment.run(_rerun_cfg(), out, dataset=other_ds, make_plots=False).to_json()
    assert again["timings_s"]["train_baseline"] > 0
    fresh = experiment.run(_rerun_cfg(), tmp_path / "fresh", dataset=other_ds, make_plots=False).to_json()
    models = {"baseline": None, "retrained": None}
    assert without_timings(again) | models == without_timings(fresh) | models
    assert again["baseline"]["clean_acc"] == fresh["baseline"]["clean_acc"]
    assert again["data"]["sha256"] == other_ds.sha256 != ds.sha256


def test_baseline_from_a_run_on_other_data_is_refused(finished, other_ds, tmp_path):
    with pytest.raises(UserError, match="trained on other data"):
        experiment.run(_rerun_cfg(), tmp_path / "x", dataset=other_ds, baseline_from=finished[0]).to_json()


# -- every damaged cache is recomputed ------------------------------------------------------------
# -- 2: every damaged cache is recomputed ----------------------------------------------------------
def _damage(path, how, seed):
    raw = path.read_bytes()
    rng = np.random.default_rng(seed)
    if how == "truncate":
        path.write_bytes(raw[: int(rng.integers(0, len(raw)))])
    else:  # flip a few bits
        b = bytearray(raw)
        for i in rng.integers(0, len(b), 8):
            b[i] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(b))


CACHES = ["baseline/passes.npz", "baseline/pass-median3.npz", "baseline/gmm.json", "retrained/eval.npz"]


@pytest.mark.parametrize("how", ["truncate", "flip"])
@pytest.mark.parametrize("name", CACHES)
@pytest.mark.parametrize("seed", [0, 1])
def test_fuzz_damaged_cache_then_rerun_gives_the_same_report_or_one_error(finished, ds, tmp_path, name, how, seed):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    _damage(out / name, how, seed)
    try:
        again = experiment.run(_rerun_cfg(), out, dataset=ds, make_plots=False).to_json()
    except UserError as e:
        assert "\n" not in str(e)
        return
    assert without_timings(again) == without_timings(finished[1])


# Each kind of damage once, on the two logs in turn: train.read_log reads both alike.
@pytest.mark.parametrize("name,how", [("baseline/metrics.jsonl", "truncate"), ("retrained/metrics.jsonl", "flip"),
                                      ("baseline/metrics.jsonl", "bad_utf8"), ("retrained/metrics.jsonl", "random")])
def test_fuzz_damaged_training_log_then_rerun_gives_the_same_report(finished, ds, tmp_path, name, how):
    # The log describes training; the checkpoint holds the model. One bad byte in it made every
    # rerun fail with UnicodeDecodeError after the old report was gone (issue 21, finding 3).
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    path = out / name
    if how == "bad_utf8":
        path.write_bytes(path.read_bytes()[:40] + b"\xff\xfe\x80" + path.read_bytes()[40:])
    elif how == "random":
        path.write_bytes(np.random.default_rng(3).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    else:
        _damage(path, how, 0)
    again = experiment.run(_rerun_cfg(), out, dataset=ds, make_plots=True).to_json()
    assert without_timings(again) == without_timings(finished[1])
    assert (out / "report.json").is_file() and (out / "plots" / "loss.png").is_file()


@pytest.mark.parametrize("value", [{"comp": [99] * 1500, "classes": []}, {"comp": [], "classes": []},
                                   {"comp": "x", "classes": [{"label": 0}]}])
def test_gmm_cache_that_does_not_fit_is_refitted(finished, ds, tmp_path, value):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    saved = json.loads((out / "baseline" / "gmm.json").read_text())
    (out / "baseline" / "gmm.json").write_text(json.dumps({"key": saved["key"], "value": value}))
    again = experiment.run(_rerun_cfg(), out, dataset=ds, make_plots=False).to_json()
    assert without_timings(again) == without_timings(finished[1])


# -- config.json and report.json describe the same run; one run at a time in a directory ------------
# -- 3: config.json and report.json describe the same run ------------------------------------------
def test_an_interrupted_rerun_leaves_no_report_that_contradicts_the_config(finished, ds, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    from ci_jax.defenses import ci

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(ci.CI, "run", boom)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(_rerun_cfg(**{"defense.ci.tau": 0.07}), out, dataset=ds, make_plots=False).to_json()
    assert json.loads((out / "config.json").read_text())["defense"]["ci"]["tau"] == 0.07
    assert not (out / "report.json").exists()


def test_a_second_run_in_the_same_directory_is_refused_while_the_first_holds_it(finished, ds, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    with files.exclusive(out / ".run.lock"):
        with pytest.raises(UserError, match="another ci-jax run is using"):
            experiment.run(_rerun_cfg(), out, dataset=ds, make_plots=False).to_json()


def test_a_no_plots_rerun_leaves_no_stale_plots(finished, ds, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    (out / "plots").mkdir(exist_ok=True)
    (out / "plots" / "roc.png").write_bytes(b"old")
    experiment.run(_rerun_cfg(**{"defense.ci.tau": 0.06}), out, dataset=ds, make_plots=False).to_json()
    assert not (out / "plots").exists()


def test_reusing_a_finished_baseline_takes_no_lock_and_writes_nothing_there(finished, ds, tmp_path):
    """A baseline borrowed with --baseline-from is only read (it may sit on a read-only mount, or be
    a colleague's run): no lock is taken there, and the new defense setting's caches go to this
    run's caches/ (issue 21, finding 6: they were written into the other run)."""
    stamp = lambda: {p: p.stat().st_mtime_ns for p in finished[0].rglob("*")}
    before = stamp()
    experiment.run(_rerun_cfg(**{"defense.ci.tau": 0.3}), tmp_path / "ablation", dataset=ds, make_plots=False,
                   baseline_from=finished[0]).to_json()
    assert stamp() == before
    assert any(p.name.startswith("defense-ci-") for p in (tmp_path / "ablation" / "caches").iterdir())


def test_a_read_only_baseline_is_used_without_its_caches(finished, ds, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ro"
    shutil.copytree(finished[0], out)
    real = files.atomic_write

    def read_only(path, write):
        if "baseline" in Path(path).parts:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, write)
    monkeypatch.setattr(files, "atomic_write", read_only)
    report = experiment.run(_rerun_cfg(**{"defense.ci.tau": 0.31}), out, dataset=ds, make_plots=False).to_json()
    assert report["baseline"] == finished[1]["baseline"]
    assert "not cached" in capsys.readouterr().out


# A full disk while the run writes its files (it trains first): one line, exit 2 (through the CLI,
# which test_cli.py's tests never let get as far as training).
def test_a_full_disk_is_one_line(capsys, tmp_path, mnist_like_dir, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    monkeypatch.setattr(files, "write_text", full)
    code, err = run_cli(["run", "--preset", "fast", "--data-dir", str(mnist_like_dir), "--out", str(tmp_path / "d"),
                         "--attack.n_poison", "10", "--train.epochs", "1", "--no-plots"], capsys)
    assert code == 2 and "No space left on device" in err and "rerun the same command" in err and "\n" not in err


# -- inputs refused before any work -----------------------------------------------------------------
# -- 4: inputs that would hang or exhaust memory ---------------------------------------------------
def test_huge_gaussian_is_refused_before_any_work(ds, tmp_path):
    with pytest.raises(UserError, match="wider than the 28-pixel image"):
        experiment.run(_rerun_cfg(**{"defense.ci.filters": ["gaussian"], "defense.ci.gaussian_sigma": 100.0}),
                       tmp_path / "g", dataset=ds).to_json()
    assert not (tmp_path / "g").exists()


def test_a_huge_eval_batch_is_refused_before_any_work(ds, tmp_path):
    with pytest.raises(UserError, match="eval.batch_size = 2147483647 is larger than"):
        experiment.run(_rerun_cfg(**{"eval.batch_size": 2147483647}), tmp_path / "e", dataset=ds).to_json()


# -- 7: the minor ones ------------------------------------------------------------------------------
def test_weight_decay_divergence_names_the_weight_decay(ds, tmp_path):
    with pytest.raises(UserError, match="weight decay 1.0.*--train.weight_decay"):
        experiment.run(_rerun_cfg(**{"train.weight_decay": 1.0, "train.lr": 1e3, "train.optimizer": "sgd"}),
                       tmp_path / "w", dataset=ds, make_plots=False).to_json()


def test_a_test_split_without_the_source_class_is_an_error(ds, tmp_path):
    keep = ds.y_test != 0
    no_source = data.Dataset("synthetic", ds.x_train, ds.y_train, ds.x_test[keep], ds.y_test[keep], 10)
    with pytest.raises(UserError, match="no test images of class 0 left"):
        experiment.run(_rerun_cfg(), tmp_path / "s", dataset=no_source).to_json()
