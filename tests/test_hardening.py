"""Hardening, round two: no silent wrong report, no traceback, no runaway input (one test or more
per finding of the probe)."""

import errno
import gzip
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ci_jax import cli, config, data, experiment, files, parallel
from ci_jax.errors import UserError

CFG = {"train.epochs": 2, "train.batch_size": 32, "eval.batch_size": 128, "attack.n_poison": 40,
       "attack.pixel.amplitude": 1.0, "defense.ci.k_max": 3, "defense.ci.covariance": "diag",
       "defense.ci.tau": 0.05}


def _cfg(**kw):
    return config.preset("fast", {**CFG, **kw})


def _bare(report):
    return {k: v for k, v in report.items() if k != "timings_s"} | {
        "defense": {k: v for k, v in report["defense"].items() if k != "timings_s"}}


@pytest.fixture(scope="module")
def ds():
    return data.synthetic(n_train=1500, n_test=300, seed=0)


@pytest.fixture(scope="module")
def other_ds():
    return data.synthetic(n_train=1500, n_test=300, seed=5)


@pytest.fixture(scope="module")
def finished(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    return out, experiment.run(_cfg(), out, dataset=ds, make_plots=False).to_json()


# -- 1: other data never reuses the old model ------------------------------------------------------
def test_rerun_on_other_data_trains_anew_and_reports_the_new_data(finished, ds, other_ds, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    again = experiment.run(_cfg(), out, dataset=other_ds, make_plots=False).to_json()
    assert again["timings_s"]["train_baseline"] > 0
    fresh = experiment.run(_cfg(), tmp_path / "fresh", dataset=other_ds, make_plots=False).to_json()
    assert _bare(again) | {"baseline": None, "retrained": None} == _bare(fresh) | {"baseline": None, "retrained": None}
    assert again["baseline"]["clean_acc"] == fresh["baseline"]["clean_acc"]
    assert again["data"]["sha256"] == other_ds.sha256 != ds.sha256


def test_baseline_from_a_run_on_other_data_is_refused(finished, other_ds, tmp_path):
    with pytest.raises(UserError, match="trained on other data"):
        experiment.run(_cfg(), tmp_path / "x", dataset=other_ds, baseline_from=finished[0]).to_json()


def test_model_key_covers_every_field_that_trains_the_model():
    """Every field of seed, data, train and the chosen attack changes the key; eval and defense
    fields do not. A new training field is covered without listing it anywhere."""
    base = config.preset("default")
    key = config.model_key(base, "data")
    for path, leaf in config.PATHS.items():
        head = path.split(".")[0]
        value = config.settings.get(base, path) if hasattr(config, "settings") else None
        other = _another_value(leaf, value)
        if other is None:
            continue
        try:
            changed = config.replace(base, {path: other})
        except UserError:
            continue  # e.g. source equal to target
        moves = config.model_key(changed, "data") != key
        chosen_attack = not path.startswith("attack.") or path.count(".") == 1 or path.startswith("attack.pixel.")
        if head in ("seed", "data", "train") or (head == "attack" and chosen_attack):
            assert moves, path
        else:
            assert not moves, path
    assert config.model_key(base, "other data") != key


def _another_value(leaf, value):
    if leaf.kind is bool:
        return not value
    if leaf.kind is tuple:
        return None if leaf.meta["choices"] is None else (next(c for c in leaf.meta["choices"] if c not in value),)
    if leaf.meta["choices"] is not None:
        return next((c for c in leaf.meta["choices"] if c != value), None)
    if leaf.kind is int:
        return value + 1 if leaf.meta["high"] is None or value < leaf.meta["high"] else value - 1
    if leaf.kind is float:
        return value * 0.5 if value else 0.5
    return None


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
        again = experiment.run(_cfg(), out, dataset=ds, make_plots=False).to_json()
    except UserError as e:
        assert "\n" not in str(e)
        return
    assert _bare(again) == _bare(finished[1])


@pytest.mark.parametrize("how", ["truncate", "flip", "bad_utf8", "random"])
@pytest.mark.parametrize("name", ["baseline/metrics.jsonl", "retrained/metrics.jsonl"])
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
    again = experiment.run(_cfg(), out, dataset=ds, make_plots=True).to_json()
    assert _bare(again) == _bare(finished[1])
    assert (out / "report.json").is_file() and (out / "plots" / "loss.png").is_file()


@pytest.mark.parametrize("value", [{"comp": [99] * 1500, "classes": []}, {"comp": [], "classes": []},
                                   {"comp": "x", "classes": [{"label": 0}]}])
def test_gmm_cache_that_does_not_fit_is_refitted(finished, ds, tmp_path, value):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    saved = json.loads((out / "baseline" / "gmm.json").read_text())
    (out / "baseline" / "gmm.json").write_text(json.dumps({"key": saved["key"], "value": value}))
    assert _bare(experiment.run(_cfg(), out, dataset=ds, make_plots=False).to_json()) == _bare(finished[1])


# -- 3: config.json and report.json describe the same run ------------------------------------------
def test_an_interrupted_rerun_leaves_no_report_that_contradicts_the_config(finished, ds, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    from ci_jax.defenses import ci

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(ci.CI, "run", boom)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(_cfg(**{"defense.ci.tau": 0.07}), out, dataset=ds, make_plots=False).to_json()
    assert json.loads((out / "config.json").read_text())["defense"]["ci"]["tau"] == 0.07
    assert not (out / "report.json").exists()


def test_a_second_run_in_the_same_directory_is_refused_while_the_first_holds_it(finished, ds, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    with files.exclusive(out / ".run.lock"):
        with pytest.raises(UserError, match="another ci-jax run is using"):
            experiment.run(_cfg(), out, dataset=ds, make_plots=False).to_json()


def test_a_no_plots_rerun_leaves_no_stale_plots(finished, ds, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    (out / "plots").mkdir(exist_ok=True)
    (out / "plots" / "roc.png").write_bytes(b"old")
    experiment.run(_cfg(**{"defense.ci.tau": 0.06}), out, dataset=ds, make_plots=False).to_json()
    assert not (out / "plots").exists()


# -- 4: inputs that would hang or exhaust memory ---------------------------------------------------
def test_huge_gaussian_is_refused_before_any_work(ds, tmp_path):
    with pytest.raises(UserError, match="wider than the 28-pixel image"):
        experiment.run(_cfg(**{"defense.ci.filters": ["gaussian"], "defense.ci.gaussian_sigma": 100.0}),
                       tmp_path / "g", dataset=ds).to_json()
    assert not (tmp_path / "g").exists()


def test_gzip_bomb_header_is_refused_before_reading(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + struct.pack(">3I", 4294967295, 28, 28)
    path.write_bytes(gzip.compress(header + bytes(1 << 20)))
    with pytest.raises(UserError, match="more than a .*-byte file can hold"):  # from the header alone
        data.read_idx(path, ndim=3)


def test_yaml_aliases_are_refused(tmp_path):
    bomb = tmp_path / "spec.yaml"
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]'] + [
        f'{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]' for i in range(8)]
    bomb.write_text("\n".join(lines) + "\nname: *i\n")
    with pytest.raises(UserError, match="aliases"):
        config.load_file(bomb)


def test_a_huge_sweep_grid_is_refused(monkeypatch):
    from ci_jax import sweep

    monkeypatch.setattr(files, "available_memory", lambda: 1 << 30)
    spec = {"grid": {"defense.ci.tau": [0.1 * i for i in range(1, 200)], "defense.ci.k_max": list(range(1, 200)),
                     "defense.ci.reg_covar": [1e-3 * i for i in range(1, 200)]}}
    with pytest.raises(UserError, match="would not fit"):
        sweep.expand(spec)


def test_a_huge_eval_batch_is_refused_before_any_work(ds, tmp_path):
    with pytest.raises(UserError, match="eval.batch_size = 2147483647 is larger than"):
        experiment.run(_cfg(**{"eval.batch_size": 2147483647}), tmp_path / "e", dataset=ds).to_json()


def test_a_config_that_is_not_a_regular_file_is_refused():
    with pytest.raises(UserError, match="not a regular file"):
        config.load_file("/dev/zero.json") if os.path.exists("/dev/zero.json") else \
            files.read_small_text("/dev/zero", "config file")


# -- 5: OSErrors are one line and exit 2 ------------------------------------------------------------
def _run_cli(args, capsys):
    code = cli.main(args)
    err = capsys.readouterr().err.strip()
    return code, _after_startup(err)


def _after_startup(err: str) -> str:
    """stderr without the start-up line, which comes before the data is read."""
    first, _, rest = err.partition("\n")
    return rest if first.startswith("ci-jax ") and ": backend " in first else err


def test_out_that_is_a_file_or_under_a_file(capsys, tmp_path, mnist_like_dir):
    f = tmp_path / "file"
    f.write_text("x")
    for out in (f, f / "sub"):
        code, err = _run_cli(["run", "--preset", "fast", "--data-dir", str(mnist_like_dir), "--out", str(out),
                              "--attack.n_poison", "10"], capsys)
        assert code == 2 and err.startswith("ci-jax: error: --out") and "\n" not in err


def test_empty_out_is_refused(capsys, mnist_like_dir):
    code, err = _run_cli(["run", "--preset", "fast", "--data-dir", str(mnist_like_dir), "--out", "",
                          "--attack.n_poison", "10"], capsys)
    assert code == 2 and "--out is empty" in err


def test_batch_larger_than_the_training_set_leaves_nothing_behind(capsys, tmp_path, mnist_like_dir):
    out = tmp_path / "b"
    code, err = _run_cli(["run", "--preset", "fast", "--data-dir", str(mnist_like_dir), "--out", str(out),
                          "--attack.n_poison", "10", "--train.batch_size", "1000"], capsys)
    assert code == 2 and "train.batch_size = 1000 is larger than the 400 images" in err
    assert not out.exists()


def test_a_full_disk_is_one_line(capsys, tmp_path, mnist_like_dir, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    monkeypatch.setattr(files, "write_text", full)
    code, err = _run_cli(["run", "--preset", "fast", "--data-dir", str(mnist_like_dir), "--out", str(tmp_path / "d"),
                          "--attack.n_poison", "10", "--train.epochs", "1", "--no-plots"], capsys)
    assert code == 2 and "No space left on device" in err and "rerun the same command" in err and "\n" not in err


def test_reusing_a_finished_baseline_takes_no_lock_and_writes_nothing_there(finished, ds, tmp_path):
    """A baseline borrowed with --baseline-from is only read (it may sit on a read-only mount, or be
    a colleague's run): no lock is taken there, and the new defense setting's caches go to this
    run's caches/ (issue 21, finding 6: they were written into the other run)."""
    stamp = lambda: {p: p.stat().st_mtime_ns for p in finished[0].rglob("*")}
    before = stamp()
    experiment.run(_cfg(**{"defense.ci.tau": 0.3}), tmp_path / "ablation", dataset=ds, make_plots=False,
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
    report = experiment.run(_cfg(**{"defense.ci.tau": 0.31}), out, dataset=ds, make_plots=False).to_json()
    assert report["baseline"] == finished[1]["baseline"]
    assert "not cached" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--repeats", "-1"], ["--pass-images", "-5"], ["--steps", "0"]])
def test_bench_rejects_non_positive_counts(capsys, args):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--quick", *args])
    assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err


# -- 6: workers die with their parent ----------------------------------------------------------------
WORKER_SCRIPT = """
import os, sys, time
sys.path.insert(0, {root!r})
from ci_jax import parallel
def slow(i):
    time.sleep(120)
    return os.getpid()
if __name__ == "__main__":
    parallel.map_processes(slow, [(0,), (1,)], max_workers=2)
"""


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=,ppid=,args=", "-e"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "loky" in line or "joblib" in line or str(pid) in line.split()[1:2]]


@pytest.mark.timing
def test_workers_die_with_a_killed_parent(tmp_path):
    script = tmp_path / "w.py"
    script.write_text(WORKER_SCRIPT.format(root=os.getcwd()))
    parent = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.time() + 60
        kids = []
        while time.time() < deadline and len(kids) < 2:
            out = subprocess.run(["ps", "-o", "pid=,ppid=", "-e"], capture_output=True, text=True).stdout
            kids = [int(p) for p, pp in (line.split() for line in out.splitlines()) if int(pp) == parent.pid]
            time.sleep(0.5)
        workers = [k for k in kids]
        assert workers, "no worker started"
    finally:
        parent.kill()
        parent.wait()
    # Each worker checks its parent every WATCH_S; a loaded machine may schedule it late, so wait
    # for the outcome rather than for a fixed time.
    deadline = time.time() + 60 * parallel.WATCH_S
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not [w for w in workers if _alive(w)]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


# -- 7: the minor ones ------------------------------------------------------------------------------
def test_weight_decay_divergence_names_the_weight_decay(ds, tmp_path):
    with pytest.raises(UserError, match="weight decay 1.0.*--train.weight_decay"):
        experiment.run(_cfg(**{"train.weight_decay": 1.0, "train.lr": 1e3, "train.optimizer": "sgd"}),
                       tmp_path / "w", dataset=ds, make_plots=False).to_json()


def test_a_test_split_without_the_source_class_is_an_error(ds, tmp_path):
    keep = ds.y_test != 0
    no_source = data.Dataset("synthetic", ds.x_train, ds.y_train, ds.x_test[keep], ds.y_test[keep], 10)
    with pytest.raises(UserError, match="no test images of class 0 left"):
        experiment.run(_cfg(), tmp_path / "s", dataset=no_source).to_json()


def test_negative_numbers_after_a_flag_are_values(capsys, mnist_like_dir, tmp_path):
    code, err = _run_cli(["run", "--preset", "fast", "--data-dir", str(mnist_like_dir), "--out", str(tmp_path / "n"),
                          "--train.lr", "-1e-3"], capsys)
    assert code == 2 and "train.lr = -0.001: must be > 0.0" in err


@pytest.mark.parametrize("name,text", [("c.json", '{"seed": 1, "seed": 2}'), ("c.yaml", "seed: 1\nseed: 2\n"),
                                       ("n.yaml", "train:\n  lr: 0.1\ntrain.lr: 0.2\n")])
def test_keys_given_twice_are_refused(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError, match="given twice"):
        config.flatten(config.load_file(path), str(path))


def test_an_old_flat_field_name_gets_its_new_path():
    with pytest.raises(UserError, match="'tau' is now defense.ci.tau"):
        config.from_dict({"tau": 0.3})


def _default_sigint() -> None:
    # A suite started in the background by a shell without job control (`cmd &` in a script)
    # inherits SIGINT ignored, and so would the CLI under test: give it the default back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.timing
@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "interrupted")])
def test_sigint_and_sigterm_end_with_one_line(mnist_like_dir, tmp_path, sig, code, word):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "ci_jax.cli", "run", "--preset", "fast", "--data-dir",
                             str(mnist_like_dir), "--out", str(tmp_path / "r"), "--train.epochs", "50",
                             "--attack.n_poison", "10", "--no-plots"], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, preexec_fn=_default_sigint)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "r" / "baseline" / "key.json").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip() and "step/s" not in line and "it/s" not in line]
    assert proc.returncode == code, err[-2000:]
    assert lines[-1].startswith(f"ci-jax: {word}") and "Traceback" not in err
    assert not list((tmp_path / "r").rglob("*.tmp"))
