"""End to end on a small synthetic task: the planted trigger must be learned, found and removed."""

import json

import numpy as np
import pytest

from ci_jax import config, data, experiment
from ci_jax.errors import UserError

# diag: with ~200 images a class, full 128-D covariances cost BIC too much to ever split a class.
CFG = dict(epochs=3, batch_size=32, eval_batch_size=128, n_poison=60, amplitude=1.0, k_max=4, covariance="diag")


@pytest.fixture(scope="module")
def ds():
    return data.synthetic(n_train=1500, n_test=500, seed=0)


@pytest.fixture(scope="module")
def first_run(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, experiment.run(config.preset("fast", **CFG), out, dataset=ds)


def test_trigger_found_and_removed(first_run):
    out, report = first_run
    assert report["baseline"]["clean_acc"] > 0.9
    assert report["baseline"]["asr"] > 0.9
    d = report["defense"]
    assert d["tpr"] >= 0.95 and d["fpr"] <= 0.01 and d["auc"] > 0.95
    assert report["retrained"]["asr"] < 0.1
    assert report["retrained"]["clean_acc"] > 0.9
    target = next(c for c in d["classes"] if c["label"] == 2)
    assert target["k"] >= 2 and any(c["flagged"] and c["poisons"] > 50 for c in target["components"])


def test_run_directory(first_run):
    out, report = first_run
    assert json.loads((out / "report.json").read_text()) == report
    assert json.loads((out / "config.json").read_text())["n_poison"] == 60
    for name in ("examples", "bic", "impurity", "roc"):
        assert (out / "plots" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "baseline" / "done.json").exists() and (out / "retrained" / "done.json").exists()
    assert set(report["timings_s"]) == {"data", "train_baseline", "features", "evaluate", "gmm", "impurity",
                                       "retrain", "total"}
    assert not list(out.rglob("*.tmp"))
    with np.load(out / "defense.npz") as z:
        assert len(z["removed_idx"]) == report["defense"]["removed"]
        assert z["score"].shape == (1500,)
        assert set(z["poison_idx"]) <= set(z["removed_idx"]) or report["defense"]["tpr"] < 1


def _without_timings(report):
    return {k: v for k, v in report.items() if k != "timings_s"}


def test_rerun_reuses_checkpoints_and_is_identical(first_run, ds):
    out, report = first_run
    again = experiment.run(config.preset("fast", **CFG), out, dataset=ds)
    assert again["timings_s"]["train_baseline"] == 0.0 and again["timings_s"]["retrain"] == 0.0
    assert _without_timings(again) == _without_timings(report)


def test_defense_change_reuses_baseline(first_run, ds, tmp_path):
    out, report = first_run
    changed = experiment.run(config.preset("fast", **CFG, filter="mean3", tau=0.3), out, dataset=ds, make_plots=False)
    assert changed["timings_s"]["train_baseline"] == 0.0
    assert changed["baseline"] == report["baseline"]
    assert changed["config"]["filter"] == "mean3"


def test_same_seed_same_report_in_a_fresh_directory(first_run, ds, tmp_path):
    _, report = first_run
    fresh = experiment.run(config.preset("fast", **CFG), tmp_path / "fresh", dataset=ds, make_plots=False)
    assert _without_timings(fresh) == _without_timings(report)


def test_baseline_from_another_run(first_run, ds, tmp_path):
    out, report = first_run
    other = experiment.run(config.preset("fast", **CFG, tau=0.3), tmp_path / "ablation", dataset=ds,
                           make_plots=False, baseline_from=out)
    assert other["timings_s"]["train_baseline"] == 0.0
    assert other["baseline"]["clean_acc"] == report["baseline"]["clean_acc"]
    assert not (tmp_path / "ablation" / "baseline").exists()


def test_baseline_from_a_run_with_other_training_is_refused(first_run, ds, tmp_path):
    out, _ = first_run
    with pytest.raises(UserError, match="lr differ"):
        experiment.run(config.preset("fast", **CFG, lr=0.01), tmp_path / "x", dataset=ds, baseline_from=out)


def test_nothing_removed_reuses_the_baseline_as_the_retrained_model(ds, tmp_path):
    report = experiment.run(config.preset("fast", **{**CFG, "n_poison": 0}), tmp_path / "clean", dataset=ds,
                            make_plots=False)
    assert report["defense"]["removed"] == 0
    assert report["retrained"] == {**report["baseline"], "checkpoint": "baseline"}
    assert report["timings_s"]["retrain"] == 0.0
    assert not (tmp_path / "clean" / "retrained").exists()


# -- kill -9 and resume -------------------------------------------------------------------------
RESUME_ARGS = ["--preset", "fast", "--epochs", "2", "--batch-size", "32", "--eval-batch-size", "128",
               "--n-poison", "20", "--amplitude", "1.0", "--k-max", "3", "--covariance", "diag",
               "--tau", "0.05", "--no-plots"]


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


@pytest.mark.parametrize("kill_at", ["baseline-epoch", "gmm", "retrain-epoch", "write:report.json"])
def test_killed_run_resumes_to_the_same_report(kill_at, uninterrupted, mnist_like_dir, tmp_path):
    killed = _cli(tmp_path, mnist_like_dir, kill_at)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "report.json").exists()
    resumed = _cli(tmp_path, mnist_like_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert _without_timings(report) == _without_timings(uninterrupted)
    if kill_at == "gmm":  # the finished baseline is reused, not retrained
        assert report["timings_s"]["train_baseline"] == 0.0
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
        experiment.run(config.preset("fast", **CFG), out, dataset=ds)
    assert not any((out / name).exists() for name in ("config.json", "provenance.json", "report.json"))
