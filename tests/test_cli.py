"""The CLI: every bad input is exit code 2 and one `ci-jax: error:` line, before any training,
and no report is written."""

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ci_jax import cli, data, version

from helpers import STARTUP, after_startup, run_cli

@pytest.fixture(autouse=True)
def _no_training(monkeypatch):
    """Training a model is a failure here: every input below must be rejected before it."""
    from ci_jax import train

    def boom(*args, **kwargs):
        raise AssertionError("training started: the bad input was not rejected early")

    monkeypatch.setattr(train, "Trainer", boom)
    monkeypatch.setattr(train, "train", boom)
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    # main() sets XLA_FLAGS if absent; keep that from leaking into other tests.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "--xla_force_host_platform_device_count=1"))


def _write_idx_dir(path, n_train=200, n_test=50, seed=0):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data.write_idx(path / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8))
    data.write_idx(path / "train-labels-idx1-ubyte", (np.arange(n_train) % 10).astype(np.uint8))
    data.write_idx(path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8))
    data.write_idx(path / "t10k-labels-idx1-ubyte", (np.arange(n_test) % 10).astype(np.uint8))
    return path


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    """A small valid MNIST-shaped IDX dir: 200 train (20 per class) and 50 test images."""
    return _write_idx_dir(tmp_path_factory.mktemp("idx") / "mnist")


def _fail(capsys, tmp_path, *args, data_dir=None):
    """Runs `ci-jax run ARGS` in-process; checks the one-line error contract; returns the message."""
    out = tmp_path / "run"
    argv = ["run", "--out", str(out), "--no-plots", *args]
    if data_dir is not None:
        argv += ["--data-dir", str(data_dir)]
    capsys.readouterr()  # drop anything printed before
    rc = cli.main(argv)
    captured = capsys.readouterr()
    assert rc == 2, captured
    lines = after_startup(captured.err)
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("ci-jax: error: "), lines[0]
    assert captured.out == ""
    assert not (out / "report.json").exists()  # and no training: the _no_training fixture
    return lines[0]


# --- attack checks against the data ------------------------------------------------------------


def test_trigger_off_the_image(capsys, tmp_path, idx_dir):
    msg = _fail(capsys, tmp_path, "--attack.pixel.row", "40", "--attack.n_poison", "5", data_dir=idx_dir)
    assert "trigger" in msg and "40" in msg and "28x28" in msg and "--attack.pixel.row in 0..27" in msg


def test_patch_off_the_image(capsys, tmp_path, idx_dir):
    msg = _fail(capsys, tmp_path, "--attack.name", "patch", "--attack.patch.col", "26", "--attack.n_poison", "5",
                data_dir=idx_dir)
    assert "trigger patch at (24, 26)" in msg and "--attack.patch.col in 0..25" in msg


def test_negative_trigger_col(capsys, tmp_path, idx_dir):
    msg = _fail(capsys, tmp_path, "--attack.pixel.col", "-1", "--attack.n_poison", "5", data_dir=idx_dir)
    assert "attack.pixel.col" in msg and "-1" in msg


def test_more_poisons_than_the_source_class_has(capsys, tmp_path, idx_dir):
    msg = _fail(capsys, tmp_path, "--attack.n_poison", "21", data_dir=idx_dir)
    assert "21" in msg and "20" in msg and "--attack.n_poison" in msg


def test_default_poison_count_too_large_for_a_small_dataset(capsys, tmp_path, idx_dir):
    msg = _fail(capsys, tmp_path, data_dir=idx_dir)  # the default n_poison is 1000
    assert "1000" in msg and "class 0" in msg


def test_source_not_a_class_of_the_dataset(capsys, tmp_path, idx_dir):
    msg = _fail(capsys, tmp_path, "--attack.source", "12", "--attack.n_poison", "5", data_dir=idx_dir)
    assert "attack.source 12 is not a class of this dataset" in msg and "0..9" in msg


def test_a_reserve_larger_than_the_test_split(capsys, tmp_path, idx_dir):
    msg = _fail(capsys, tmp_path, "--eval.reserve", "50", "--attack.n_poison", "5", data_dir=idx_dir)
    assert "eval.reserve = 50" in msg and "50-image test split" in msg


def test_a_training_batch_larger_than_the_training_set(capsys, tmp_path, idx_dir):
    msg = _fail(capsys, tmp_path, "--train.batch_size", "256", "--attack.n_poison", "5", data_dir=idx_dir)
    assert "--train.batch_size = 256 is larger than the 200 images" in msg


# --- config checks -----------------------------------------------------------------------------


def test_source_equals_target(capsys, tmp_path, idx_dir):
    msg = _fail(capsys, tmp_path, "--attack.source", "3", "--attack.target", "3", data_dir=idx_dir)
    assert "attack.source and attack.target" in msg


@pytest.mark.parametrize("flag, value, choices", [
    ("--data.dataset", "svhn", ["mnist", "fashion_mnist", "cifar10"]),
    ("--train.model", "vgg16", ["resnet20", "cnn"]),
    ("--defense.ci.filters", "blur", ["mean2", "mean3", "median3", "gaussian", "noise", "quant"]),
    ("--defense.ci.rule", "top2", ["threshold", "top1", "test"]),
    ("--defense.ci.bic_search", "grid", ["sweep", "ascent"]),
    ("--attack.name", "sticker", ["none", "pixel", "patch", "blend"]),
    ("--defense.name", "sticker", ["ci", "ac", "ss"]),
])
def test_unknown_name(capsys, tmp_path, idx_dir, flag, value, choices):
    msg = _fail(capsys, tmp_path, flag, value, data_dir=idx_dir)
    assert flag[2:] in msg and repr(value) in msg
    for choice in choices:
        assert choice in msg


@pytest.mark.parametrize("flag, value, expected", [
    ("--defense.ci.k_max", "0", "defense.ci.k_max = 0: must be from 1 to 1000"),
    ("--defense.ci.tau", "-0.5", "defense.ci.tau = -0.5: must be >= 0.0"),
    ("--train.batch_size", "0", "train.batch_size = 0: must be >= 1"),
    ("--attack.pixel.amplitude", "-1", "attack.pixel.amplitude = -1.0: must be > 0.0"),
    ("--attack.n_poison", "-3", "attack.n_poison = -3: must be >= 0"),
    ("--train.epochs", "0", "train.epochs = 0: must be from 1 to 100000"),
    ("--train.lr", "-1e-3", "train.lr = -0.001: must be > 0.0"),
    ("--eval.reserve", "-1", "eval.reserve = -1: must be >= 0")])
def test_out_of_range_field(capsys, tmp_path, idx_dir, flag, value, expected):
    assert _fail(capsys, tmp_path, flag, value, data_dir=idx_dir) == f"ci-jax: error: config field {expected}"


def test_a_negative_flag_value_is_that_value():
    # argparse takes "-1e-3" for a flag; the CLI joins it to the flag before it.
    assert cli._join_negative_values(["run", "--train.lr", "-1e-3", "--attack.source", "-1", "--no-plots"]) == \
        ["run", "--train.lr=-1e-3", "--attack.source=-1", "--no-plots"]
    assert cli._join_negative_values(["--out", "-run-", "--seed=3", "-5"]) == ["--out", "-run-", "--seed=3", "-5"]


@pytest.mark.parametrize("flag, value, expected", [
    ("--attack.pixel.clip", "yes", "expected true or false"), ("--defense.ci.k_max", "abc", "expected an int"),
    ("--defense.ci.tau", "half", "expected a number")])
def test_a_flag_value_that_does_not_parse(capsys, tmp_path, idx_dir, flag, value, expected):
    msg = _fail(capsys, tmp_path, flag, value, data_dir=idx_dir)
    assert f"{flag} {value!r}: {expected}" in msg
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


# --- data checks -------------------------------------------------------------------------------


def test_missing_idx_directory(capsys, tmp_path):
    missing = tmp_path / "no-such-dir"
    msg = _fail(capsys, tmp_path, data_dir=missing)
    assert str(missing) in msg and "does not exist" in msg


def test_idx_directory_without_data_files(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = _fail(capsys, tmp_path, data_dir=empty)
    assert "no data files" in msg


def test_truncated_idx_file(capsys, tmp_path, idx_dir):
    bad = shutil.copytree(idx_dir, tmp_path / "bad")
    path = bad / "train-images-idx3-ubyte"
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    msg = _fail(capsys, tmp_path, "--attack.n_poison", "5", data_dir=bad)
    assert "train-images-idx3-ubyte" in msg and "truncated" in msg


def test_one_idx_file_missing(capsys, tmp_path, idx_dir):
    bad = shutil.copytree(idx_dir, tmp_path / "bad")
    (bad / "t10k-labels-idx1-ubyte").unlink()
    msg = _fail(capsys, tmp_path, "--attack.n_poison", "5", data_dir=bad)
    assert "t10k-labels-idx1-ubyte" in msg and "missing" in msg


# --- --config files ----------------------------------------------------------------------------


def test_config_file_that_is_not_json(capsys, tmp_path, idx_dir):
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"defense.ci.tau": 0.5,,}')
    msg = _fail(capsys, tmp_path, "--config", str(cfg), data_dir=idx_dir)
    assert str(cfg) in msg and "not valid JSON" in msg


def test_config_file_missing(capsys, tmp_path, idx_dir):
    msg = _fail(capsys, tmp_path, "--config", str(tmp_path / "nope.json"), data_dir=idx_dir)
    assert "nope.json" in msg and "cannot read" in msg


def test_config_file_not_an_object(capsys, tmp_path, idx_dir):
    cfg = tmp_path / "cfg.json"
    cfg.write_text("[1, 2]")
    msg = _fail(capsys, tmp_path, "--config", str(cfg), data_dir=idx_dir)
    assert "JSON object" in msg


def test_config_file_unknown_field_and_wrong_type(capsys, tmp_path, idx_dir):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"attack": {"n_poisons": 5}}))
    msg = _fail(capsys, tmp_path, "--config", str(cfg), data_dir=idx_dir)
    assert "attack.n_poisons" in msg and "did you mean 'attack.n_poison'" in msg and str(cfg) in msg
    cfg.write_text(json.dumps({"defense": {"ci": {"k_max": "3"}}}))
    assert "defense.ci.k_max" in _fail(capsys, tmp_path, "--config", str(cfg), data_dir=idx_dir)
    cfg.write_text(json.dumps({"n_poison": 5}))  # a flat name of the old config
    assert "'n_poison'" in _fail(capsys, tmp_path, "--config", str(cfg), data_dir=idx_dir)


def test_yaml_config_file_is_applied(capsys, tmp_path, idx_dir):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("# the attack, off the image\nattack:\n  pixel: {row: 40}\n  n_poison: 5\ntrain.lr: 1e-3\n")
    msg = _fail(capsys, tmp_path, "--config", str(cfg), data_dir=idx_dir)
    assert "trigger" in msg and "40" in msg


def test_yaml_config_file_that_is_not_yaml(capsys, tmp_path, idx_dir):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text("defense.ci.tau: 0.5\ndefense.ci.k_max: [3\n")
    msg = _fail(capsys, tmp_path, "--config", str(cfg), data_dir=idx_dir)
    assert str(cfg) in msg and "not valid YAML" in msg and "line" in msg


def test_flags_override_the_config_file(capsys, tmp_path, idx_dir):
    # The file's bad tau is replaced by the flag's; what is left is the attack error.
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"defense": {"ci": {"tau": -1.0}}, "attack.n_poison": 5}))
    msg = _fail(capsys, tmp_path, "--config", str(cfg), "--defense.ci.tau", "0.5", "--attack.pixel.row", "40",
                data_dir=idx_dir)
    assert "trigger" in msg


def test_valid_input_gets_as_far_as_training(tmp_path, idx_dir):
    # Sanity check of the guard above: a good command passes every check and reaches training,
    # so the errors in this file come from the checks, not from something unrelated.
    with pytest.raises(AssertionError, match="training started"):
        cli.main(["run", "--out", str(tmp_path / "run"), "--no-plots", "--data-dir", str(idx_dir),
                  "--attack.n_poison", "5"])
    assert not (tmp_path / "run" / "report.json").exists()


@pytest.mark.parametrize("flags", [
    ["--attack.source", "-1", "--attack.pixel.clip", "true", "--defense.ci.filters", "mean2", "median3"],
    ["--attack.name", "patch", "--defense.name", "ss", "--defense.ss.eps", "0.05", "--train.lr", "1e-3"],
    ["--preset", "seed", "--defense.ci.rule", "test", "--defense.retrain", "false"]])
def test_valid_flags_get_as_far_as_training(tmp_path, idx_dir, flags):
    with pytest.raises(AssertionError, match="training started"):
        cli.main(["run", "--out", str(tmp_path / "run"), "--no-plots", "--data-dir", str(idx_dir),
                  "--attack.n_poison", "5", *flags])


def test_flags_become_the_config():
    args = cli._parser().parse_args(cli._join_negative_values([
        "run", "--preset", "seed", "--attack.source", "-1", "--attack.pixel.clip", "true",
        "--defense.ci.filters", "mean2", "median3", "--defense.ci.tau", "1", "--eval.reserve", "0"]))
    cfg = cli._config(args)
    assert cfg.attack.source == -1 and cfg.attack.pixel.clip is True
    assert cfg.defense.ci.filters == ("mean2", "median3") and cfg.defense.ci.tau == 1.0
    assert cfg.train.epochs == 10 and cfg.defense.ci.rule == "top1"  # the rest from the preset


# --- argparse-level behaviour ------------------------------------------------------------------


def test_run_help_lists_field_flags(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--attack.n_poison", "--defense.ci.tau", "--defense.ci.k_max", "--defense.ci.filters",
                 "--defense.ci.rule", "--attack.pixel.row", "--attack.pixel.clip", "--train.lr", "--eval.reserve",
                 "--defense.name", "--attack.name", "--preset", "--config", "--data-dir", "--out"):
        assert flag in out
    flat = " ".join(out.split())  # argparse wraps the help text
    assert "(choices: threshold, top1, test; default: threshold (preset seed: top1))" in flat
    assert "--train.lr NUMBER" in flat and "--attack.pixel.clip true|false" in flat
    assert "--defense.ci.filters NAME [NAME ...]" in flat and "default: median3 (preset paper: mean2, seed: mean2))" in flat
    assert "config section defense.ci" in flat


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    assert "run" in capsys.readouterr().out


def _argparse_error(capsys, tmp_path, *args, command="run"):
    """`ci-jax COMMAND --out DIR ARGS` refused by argparse: exit 2, one `ci-jax: error:` line, nothing
    written; returns the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--out", str(tmp_path / "run"), *args])
    assert e.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ci-jax: error: "), captured.err
    assert captured.out == "" and not (tmp_path / "run").exists()
    return lines[0]


def test_unknown_flag_is_an_argparse_error_with_exit_2(capsys, tmp_path):
    msg = _argparse_error(capsys, tmp_path, "--k-max", "3")  # the old flat flag
    assert "unknown flag --k-max: it is now --defense.ci.k_max" in msg


@pytest.mark.parametrize("args, expected", [
    (["--defense.ci.tauu", "3"], "unknown flag --defense.ci.tauu: did you mean --defense.ci.tau?"),
    (["--defense.ci.tauu=3"], "unknown flag --defense.ci.tauu: did you mean --defense.ci.tau?"),
    (["--atack.n_poison", "3"], "unknown flag --atack.n_poison: did you mean --attack.n_poison?"),
    (["--no-plot"], "unknown flag --no-plot: did you mean --no-plots?"),
    (["--zzz"], "unknown flag --zzz (see `ci-jax run --help`)"),
    (["stray"], "unexpected argument 'stray'")])
def test_unknown_flag_suggests_the_nearest(capsys, tmp_path, args, expected):
    assert expected in _argparse_error(capsys, tmp_path, *args)


@pytest.mark.parametrize("args, expected", [
    (["--defense.ci.ta=-1"], "unknown flag --defense.ci.ta: did you mean --defense.ci.tau?"),
    (["--defense.ci.ta", "0.5"], "unknown flag --defense.ci.ta: did you mean --defense.ci.tau?"),
    (["--pre", "fast"], "unknown flag --pre"),
    # The flag before config sections fits every --defense.* flag: it was a 62-line usage dump.
    (["--defense", "ss"], "unknown flag --defense: it is now --defense.name")])
def test_a_prefix_of_a_flag_is_not_that_flag(capsys, tmp_path, args, expected):
    assert expected in _argparse_error(capsys, tmp_path, *args)


def test_no_parser_takes_prefixes():
    parser = cli._parser()
    assert not parser.allow_abbrev
    assert all(not sub.allow_abbrev for sub in parser.commands.values())


def test_a_bench_flag_typo_suggests_the_nearest(capsys, tmp_path):
    assert "unknown flag --stepz: did you mean --steps?" in _argparse_error(capsys, tmp_path, "--stepz", "3",
                                                                            command="bench")


def test_unknown_preset_is_rejected_by_argparse(capsys, tmp_path):
    msg = _argparse_error(capsys, tmp_path, "--preset", "nope")
    assert "argument --preset: invalid choice: 'nope'" in msg and "'fast'" in msg and "ci-jax run --help" in msg


def test_a_flag_without_its_value_is_one_line(capsys, tmp_path):
    assert "argument --defense.ci.tau: expected one argument" in _argparse_error(capsys, tmp_path, "--defense.ci.tau")


def test_a_missing_command_or_spec_is_one_line(capsys):
    for argv in ([], ["rn"], ["sweep"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("ci-jax: error: "), err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out == f"ci-jax {version.describe()}\n"
    assert out.startswith(f"ci-jax {importlib.metadata.version('ci-jax')}")
    git = version.git()
    if git is not None:  # a checkout: the commit, and whether its code is edited
        assert git["commit"][:12] in out and ("dirty" in out) == git["dirty"]


# --- the start-up line and the backend -----------------------------------------------------------


def test_run_starts_with_one_line_naming_version_backend_preset_and_out(capsys, tmp_path, idx_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("attack.n_poison: 5\n")
    with pytest.raises(AssertionError, match="training started"):
        cli.main(["run", "--preset", "fast", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-plots",
                  "--data-dir", str(idx_dir)])
    import jax

    first = capsys.readouterr().err.splitlines()[0]
    assert first == (f"ci-jax {version.describe()}: backend cpu, {jax.device_count()} device"
                     f"{'s' if jax.device_count() > 1 else ''} (cpu); preset fast, config {cfg} -> {tmp_path / 'run'}")


def test_sweep_and_bench_start_with_the_line_too(capsys, tmp_path):
    assert cli.main(["sweep", str(tmp_path / "no-spec.yaml"), "--out", str(tmp_path / "s")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert STARTUP.match(lines[0]) and lines[0].endswith(f"; sweep {tmp_path / 'no-spec.yaml'} -> {tmp_path / 's'}")
    assert len(lines) == 2 and lines[1].startswith("ci-jax: error: ")
    assert cli.main(["bench", "--quick", "--models", "vgg"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert STARTUP.match(lines[0]) and lines[0].endswith("; bench") and len(lines) == 2


BACKEND_ERRORS = {
    "cuda": "JAX_PLATFORMS=cuda: this JAX has no cuda backend (it has: cpu): install JAX's CUDA support: "
            "pip install -e '.[cuda12]'",
    "gpu": "JAX_PLATFORMS=gpu: this JAX has no GPU backend (cuda or rocm) (it has: cpu): install JAX's CUDA support",
    "tpu": "JAX_PLATFORMS=tpu: this JAX has no tpu backend (it has: cpu): install JAX's TPU support: "
           "pip install -e '.[tpu]'",
    "nonsense": "JAX_PLATFORMS=nonsense: 'nonsense' is not a JAX backend (choose from cpu, cuda, rocm, tpu"}


@pytest.mark.slow  # the CLI as four processes, each importing JAX
def test_a_backend_that_is_not_installed_is_one_line_before_the_data_loads(tmp_path):
    # jax 0.10 failed at the first array, after the data loaded: a bare AssertionError for cuda,
    # "Unable to initialize backend 'rocm'" for gpu.
    installed = set(cli._installed_platforms())
    asked = [a for a in BACKEND_ERRORS if a not in installed and not (a == "gpu" and {"cuda", "rocm"} & installed)]
    procs = {}
    for a in asked:  # at once: each is a fresh Python importing JAX
        env = {**os.environ, "JAX_PLATFORMS": a, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
        # A data directory that does not exist: had the data been read first, that would be the error.
        procs[a] = subprocess.Popen([sys.executable, "-m", "ci_jax.cli", "run", "--preset", "fast", "--out",
                                     str(tmp_path / a), "--data-dir", str(tmp_path / "no-data")],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    for a, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (a, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"ci-jax: error: {BACKEND_ERRORS[a]}"), (a, err)
        assert "unset JAX_PLATFORMS" in lines[0] and out == ""
        assert not (tmp_path / a).exists()


def test_a_backend_that_is_installed_but_does_not_start_says_why():
    msg = cli._backend_message("cpu", RuntimeError("Unable to initialize backend 'cpu': out of\nluck"))
    assert msg.startswith("JAX_PLATFORMS=cpu: JAX could not start it: Unable to initialize backend 'cpu': out of luck")
    assert "\n" not in msg


# --- what the CLI prints ------------------------------------------------------------------------


def test_the_summary_formats_every_rate_as_a_percent_and_auc_with_4_decimals():
    import dataclasses

    from ci_jax.report import DefenseReport, Detection, Report, Scores

    detection = Detection(removed=987, tpr=0.986, fpr=1 / 59000, precision=986 / 987, auc=0.9993684576271187,
                          removed_poisons=986, poisons=1000, removed_clean=1, clean_images=59000, denominators={})
    report = Report(config={}, data={}, attack={"asr_measured_on": "test images of class 0, triggered"},
                    baseline=Scores(0.9904, 0.9296), defense=DefenseReport("ci", detection, {"gmm": 12.3}, {}),
                    retrained=Scores(0.99, None), device={}, timings_s={"total": 100.0, "defense": 20.0})
    text = cli.summary(report, "r/report.json")
    assert "clean 99.04 %  ASR 92.96 %" in text
    assert "TPR 98.60 %  FPR 0.00 %  precision 99.90 %  AUC 0.9994" in text
    assert "retrained  clean 99.00 %  ASR n/a" in text
    report = dataclasses.replace(report, defense=dataclasses.replace(
        report.defense, detection=dataclasses.replace(detection, auc=0.5)))
    assert "AUC 0.5000" in cli.summary(report, "r/report.json")


LEAVE_SCRIPT = """
import signal, sys, time
from ci_jax import cli, parallel

# A suite started without job control passes SIGINT on ignored: Python's own handler back.
signal.signal(signal.SIGINT, signal.default_int_handler)
try:
    if sys.argv[1] == "idle":  # interrupted after a defense: the pool waits for the next one
        parallel.map_processes(abs, [(-1,), (-2,)], max_workers=2)
        signal.raise_signal(signal.SIGINT)
    else:  # interrupted inside the fits
        signal.signal(signal.SIGALRM, lambda *a: signal.raise_signal(signal.SIGINT))
        signal.alarm(2)
        parallel.map_processes(time.sleep, [(60,), (60,)], max_workers=2)
except KeyboardInterrupt:
    cli._leave("ci-jax: " + cli.INTERRUPTED, 130)
"""


@pytest.mark.timing
@pytest.mark.parametrize("when", ["idle", "busy"])
def test_an_interrupt_after_worker_processes_is_exactly_one_line(tmp_path, when):
    # os._exit skipped the release of the pool's semaphores, and loky's resource tracker, a process
    # of its own, then printed a "leaked semlock objects" warning after the one line.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", LEAVE_SCRIPT, when], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "ci-jax: interrupted: rerun the same command to resume\n"


# --- helpers -----------------------------------------------------------------------------------


def test_one_cpu_device_unless_asked(monkeypatch):
    from ci_jax import kernels

    monkeypatch.setattr(kernels, "_jaxlib_version", lambda: ())  # no jaxlib-specific flag
    monkeypatch.delenv("CI_JAX_CPU_DEVICES", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1")
    cli._set_xla_flags()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_foo=1"
    monkeypatch.setenv("CI_JAX_CPU_DEVICES", "2")
    cli._set_xla_flags()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=2"


def test_set_xla_flags_keeps_the_users_setting(monkeypatch):
    from ci_jax import kernels

    monkeypatch.setattr(kernels, "_jaxlib_version", lambda: ())
    monkeypatch.setenv("CI_JAX_CPU_DEVICES", "2")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
    cli._set_xla_flags()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3"


@pytest.mark.parametrize("bad", ["0", "two", "-1"])
def test_bad_cpu_devices_is_one_error_line(monkeypatch, capsys, tmp_path, bad):
    monkeypatch.setenv("CI_JAX_CPU_DEVICES", bad)
    assert cli.main(["run", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CI_JAX_CPU_DEVICES" in err[0]


# --- as a real process -------------------------------------------------------------------------


@pytest.mark.timing
def test_subprocess_bad_input_is_one_error_line_and_exit_2(tmp_path, idx_dir):
    out = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    env.pop(data.DATA_DIR_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-m", "ci_jax.cli", "run", "--out", str(out), "--data-dir", str(idx_dir),
         "--attack.pixel.row", "40", "--attack.n_poison", "5", "--no-plots"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert STARTUP.match(proc.stderr)  # found in the data: after the start-up line
    lines = after_startup(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ci-jax: error: trigger pixel at (40, 24)")
    assert proc.stdout == ""
    assert not (out / "report.json").exists()


def test_every_choice_of_every_named_field_is_in_the_help(capsys):
    from ci_jax import config as config_lib

    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    named = [leaf for leaf in config_lib.PATHS.values() if leaf.meta["choices"] is not None]
    assert len(named) >= 15
    for leaf in named:
        assert f"--{leaf.path}" in flat
        assert f"choices: {', '.join(leaf.meta['choices'])};" in flat, leaf.path
        assert leaf.meta["help"].split()[0] in flat


def test_an_unknown_name_on_the_command_line_suggests_the_nearest(capsys, tmp_path, mnist_like_dir):
    code = cli.main(["run", "--data-dir", str(mnist_like_dir), "--out", str(tmp_path / "o"),
                     "--defense.ci.rule", "treshold"])
    assert code == 2 and "did you mean 'threshold'?" in capsys.readouterr().err


# -- --out, a full disk, signals: one line each, nothing left behind ----------------------------

def test_out_that_is_a_file_or_under_a_file(capsys, tmp_path, mnist_like_dir):
    f = tmp_path / "file"
    f.write_text("x")
    for out in (f, f / "sub"):
        code, err = run_cli(["run", "--preset", "fast", "--data-dir", str(mnist_like_dir), "--out", str(out),
                             "--attack.n_poison", "10"], capsys)
        assert code == 2 and err.startswith("ci-jax: error: --out") and "\n" not in err


def test_empty_out_is_refused(capsys, mnist_like_dir):
    code, err = run_cli(["run", "--preset", "fast", "--data-dir", str(mnist_like_dir), "--out", "",
                         "--attack.n_poison", "10"], capsys)
    assert code == 2 and "--out is empty" in err


def test_batch_larger_than_the_training_set_leaves_nothing_behind(capsys, tmp_path, mnist_like_dir):
    out = tmp_path / "b"
    code, err = run_cli(["run", "--preset", "fast", "--data-dir", str(mnist_like_dir), "--out", str(out),
                         "--attack.n_poison", "10", "--train.batch_size", "1000"], capsys)
    assert code == 2 and "train.batch_size = 1000 is larger than the 400 images" in err
    assert not out.exists()


def test_negative_numbers_after_a_flag_are_values(capsys, mnist_like_dir, tmp_path):
    code, err = run_cli(["run", "--preset", "fast", "--data-dir", str(mnist_like_dir), "--out", str(tmp_path / "n"),
                         "--train.lr", "-1e-3"], capsys)
    assert code == 2 and "train.lr = -0.001: must be > 0.0" in err


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
