"""`ci-jax bench` on tiny settings: every stage is measured and reported, nothing is trained for long."""

import json
import shutil

import jax
import jax.numpy as jnp
import pytest

from ci_jax import bench, cli

TINY = ["bench", "--quick", "--models", "cnn", "--batch-sizes", "8", "--eval-batch-sizes", "16",
        "--steps", "2", "--repeats", "1", "--pass-images", "32", "--gmm-images", "300"]


def test_quick_bench_reports_every_stage(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(TINY + ["--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"]["kind"] and report["device"]["count"] == jax.device_count()
    assert report["fp32_matmul_peak_gflops"] > 0
    stages = {s["stage"]: s for s in report["stages"]}
    assert set(stages) == {"train", "features", "filtered", "gmm", "end_to_end"}
    for name in ("train", "features", "filtered"):
        s = stages[name]
        assert s["model"] == "cnn" and s["images_per_s"] > 0 and s["compile_s"] > 0
        assert s["flops_per_image"] > 0 and 0 < s["pct_of_peak"]
    # A train step costs more than the forward pass it contains.
    assert stages["train"]["flops_per_image"] > 2 * stages["features"]["flops_per_image"]
    gmm = stages["gmm"]  # ResNet-20 features, as the default experiment clusters
    assert gmm["features"] == 300 and gmm["dim"] == 64 and gmm["fits"] >= 10 and gmm["fits_per_s"] > 0
    assert stages["end_to_end"]["seconds"] > gmm["seconds"]
    table = capsys.readouterr().out
    assert "train      cnn" in table and "fits/s" in table and str(out) in table


def test_compiled_flops_come_from_cost_analysis():
    n = 64
    a = jnp.ones((n, n))
    _, seconds, flops = bench._compile(jax.jit(jnp.dot), a, a)
    assert seconds > 0 and flops == pytest.approx(2 * n ** 3, rel=0.01)  # the whole program


def test_end_to_end_is_the_sum_of_the_stages():
    rows = [{"stage": "train", "model": "m", "images_per_s": 100.0},
            {"stage": "train", "model": "m", "images_per_s": 200.0},  # the best batch size counts
            {"stage": "features", "model": "m", "images_per_s": 1000.0},
            {"stage": "filtered", "model": "m", "images_per_s": 500.0}]
    e2e = bench.end_to_end(rows, n_train=1000, n_test=100, gmm_s=7.0, model="m")
    assert e2e["parts_s"] == {"train_baseline": 5.0, "features": 1.0, "filtered": 2.0, "gmm": 7.0,
                              "retrain": 5.0, "test_passes": 0.2}
    assert e2e["ci_stage_s"] == 10.0  # features, GMM and the filtered pass
    assert e2e["seconds"] == pytest.approx(20.2)
    assert bench.end_to_end(rows, 1000, 100, None, "m") is None


@pytest.mark.parametrize("flag", ["--models", "--gmm-model"])
def test_an_unknown_model_is_one_error_line(capsys, flag):
    assert cli.main(TINY + [flag, "vgg"]) == 2
    startup, *err = capsys.readouterr().err.strip().splitlines()
    assert startup.startswith("ci-jax ") and startup.endswith("; bench")
    assert len(err) == 1 and err[0].startswith("ci-jax: error: unknown model 'vgg'")


@pytest.mark.parametrize("bad, expected", [
    (["--batch-sizes", "0"], "argument --batch-sizes: 0 must be >= 1"),
    (["--steps", "-1"], "argument --steps: -1 must be >= 1"),
    (["--repeats", "x"], "argument --repeats: 'x' is not a whole number")])
def test_counts_that_are_not_positive_are_argparse_errors(bad, expected, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(TINY + bad)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"ci-jax: error: {expected} (see `ci-jax bench --help`)"


@pytest.mark.parametrize("args", [["--repeats", "-1"], ["--pass-images", "-5"], ["--steps", "0"]])
def test_bench_rejects_non_positive_counts(capsys, args):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--quick", *args])
    assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err


def test_gmm_stage_clusters_a_finished_runs_baseline_features(finished_run, mnist_like_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)  # a finished run (conftest.py), copied: the bench may keep what it computes
    out = tmp_path / "bench.json"
    assert cli.main(TINY + ["--data-dir", str(mnist_like_dir), "--run", str(run), "--gmm-backends", "sklearn",
                            "--out", str(out)]) == 0
    gmm = next(s for s in json.loads(out.read_text())["stages"] if s["stage"] == "gmm")
    assert gmm["source"].startswith("trained baseline of") and gmm["features"] == 300


def test_model_convs_finds_every_resnet20_convolution_once():
    convs = bench.model_convs("resnet20", 4, (28, 28, 1), 10)
    # 2 per block x 9 blocks; the grayscale stem's forward is not a convolution (kernels.tap_conv)
    assert sum(c["count"] for c in convs) == 18
    assert not any(c["is_input"] for c in convs)
    colour = bench.model_convs("resnet20", 4, (32, 32, 3), 10)
    assert sum(c["count"] for c in colour) == 19 and [c["is_input"] for c in colour].count(True) == 1
    by_shape = {(c["lhs"][1:], c["rhs"]): c["count"] for c in convs}
    assert by_shape[((28, 28, 16), (3, 3, 16, 16))] == 6
    assert by_shape[((28, 28, 16), (3, 3, 16, 32))] == 1  # the strided one that opens stage 2
    assert by_shape[((7, 7, 64), (3, 3, 64, 64))] == 5


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU's kernels")
def test_model_convs_of_the_cnn_leave_out_its_grayscale_stem():
    # On the CPU the models run kernels.cpu_conv: a 1-channel stride-1 convolution is taps.
    gray = bench.model_convs("cnn", 4, (28, 28, 1), 10)
    assert [(c["lhs"][1:], c["rhs"]) for c in gray] == [((14, 14, 16), (5, 5, 16, 32))]
    assert [c["is_input"] for c in bench.model_convs("cnn", 4, (32, 32, 3), 10)] == [True, False]


def test_conv_ceiling_bounds_the_train_step(capsys):
    r = bench.bench_convs("cnn", 4, (32, 32, 3), 10, repeats=1, peak=100.0)  # colour: both convs are convs
    assert [c["count"] for c in r["convs"]] == [1, 1]
    first, second = r["convs"]
    assert "input_grad_ms" not in first and second["input_grad_ms"] > 0  # images take no gradient
    for c in r["convs"]:
        assert c["forward_ms"] > 0 and c["kernel_grad_ms"] > 0 and c["forward_gflops"] > 0
    total_ms = sum(c[k] for c in r["convs"] for k in ("forward_ms", "input_grad_ms", "kernel_grad_ms") if k in c)
    assert r["train_ceiling_images_per_s"] == pytest.approx(4 / total_ms * 1e3)
    assert r["pass_ceiling_images_per_s"] > r["train_ceiling_images_per_s"]
    bench._print_row(r)
    assert "train step <=" in capsys.readouterr().out
