"""The CLI: commands listed, user mistakes become one line on stderr and exit status 2."""

import json
import subprocess
import sys

import pytest


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dede_rt.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def assert_one_line_error(proc, fragment):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr


def test_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("train", "demo", "info"):
        assert command in proc.stdout


def test_missing_encoder(tmp_path):
    (tmp_path / "data").mkdir()
    proc = run_cli("train", "--encoder", tmp_path / "nope.pth", "--data", tmp_path / "data", "--out", tmp_path / "o")
    assert_one_line_error(proc, "encoder file not found")


def test_corrupt_checkpoint(tmp_path, demo_images):
    (tmp_path / "bad.pth").write_bytes(b"this is not a checkpoint")
    proc = run_cli("train", "--encoder", tmp_path / "bad.pth", "--data", tmp_path, "--out", tmp_path / "o")
    assert_one_line_error(proc, "not a readable PyTorch checkpoint")


def test_empty_folder(tmp_path, encoder_file):
    (tmp_path / "empty").mkdir()
    proc = run_cli("train", "--encoder", encoder_file, "--data", tmp_path / "empty", "--out", tmp_path / "o")
    assert_one_line_error(proc, "no images found")


def test_missing_data(tmp_path, encoder_file):
    proc = run_cli("train", "--encoder", encoder_file, "--data", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert_one_line_error(proc, "no such file or directory")


def test_bad_option_values(tmp_path, encoder_file):
    proc = run_cli("train", "--encoder", encoder_file, "--data", tmp_path, "--out", tmp_path / "o", "--mean", "1,2")
    assert_one_line_error(proc, "three comma-separated numbers")
    proc = run_cli("train", "--encoder", encoder_file, "--data", tmp_path, "--out", tmp_path / "o",
                   "--train-precision", "fp8")
    assert_one_line_error(proc, "unknown training precision 'fp8'")
    proc = run_cli("train", "--encoder", encoder_file, "--data", tmp_path, "--out", tmp_path / "o", "--score", "best")
    assert_one_line_error(proc, "unknown score kind")


def test_wrong_embedding_dimension(edited_bundle):
    bundle = edited_bundle(lambda m: m["decoder"].update(embed_dim=2048))
    assert_one_line_error(run_cli("info", bundle), "expects 2048-d")


def _png_folder(folder, images):
    """The images as PNG files in a new folder (a user's training data)."""
    from PIL import Image

    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return folder


def test_train_end_to_end_writes_a_bundle(tmp_path, encoder_file, demo_images):
    data = _png_folder(tmp_path / "data", demo_images.images[:120])
    out = tmp_path / "det"
    proc = run_cli("train", "--encoder", encoder_file, "--data", data, "--out", out, "--epochs", 1, "--dim", 32,
                   "--heads", 2, "--encoder-depth", 1, "--decoder-depth", 1, "--holdout", 0.25, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "detector written" in proc.stdout
    info = json.loads(run_cli("info", out, "--json").stdout)
    assert info["training"]["images"] == 90 and info["training"]["threshold_images"] == 30
    assert info["quality"]["epochs_run"] == 1 and info["quality"]["stopped"] == "epochs"
    assert (out / "training_curve.png").stat().st_size > 1000
    report = run_cli("info", out).stdout  # the readable form: how it trained, its clean scores and thresholds
    assert "1 epochs (fixed schedule)" in report and "clean scores (n=30)" in report and "FPR 0.01" in report
    # the default score kind (scoring.DEFAULT_SCORE): relative, k = 32 of the 90 training images' prototypes
    assert info["score"]["kind"] == "relative" and info["score"]["relative_k"] == 32
    assert info["score"]["prototypes"] == 90 and info["decoder"]["qkv_bias"] is False
    # --dim etc. override the default decoder size's fields (small), so the bundle records a custom shape
    assert info["decoder"]["dim"] == 32 and info["training"]["decoder_size"] == "custom"
    # the relative score: prototypes from the 90 training images; the exported graph computes it too
    rel = tmp_path / "det_rel"
    proc = run_cli("train", "--encoder", encoder_file, "--data", data, "--out", rel, "--epochs", 1, "--dim", 32,
                   "--heads", 2, "--encoder-depth", 1, "--decoder-depth", 1, "--holdout", 0.25, "--quiet",
                   "--score", "relative", "--relative-k", 8, "--prototypes", 64)
    assert proc.returncode == 0, proc.stderr
    score = json.loads(run_cli("info", rel, "--json").stdout)["score"]
    assert score["kind"] == "relative" and score["relative_k"] == 8 and score["prototypes"] == 64
    proc = run_cli("export", rel)
    assert proc.returncode == 0, proc.stderr
    assert (rel / "onnx" / "detector.onnx").is_file()


def test_train_default_score_is_the_library_default():
    """The CLI writes the default kind out (no torch import for --help): it must be scoring.DEFAULT_SCORE."""
    import inspect

    from dede_rt import cli
    from dede_rt.scoring import DEFAULT_SCORE

    option = inspect.signature(cli.train).parameters["score"].default
    assert option.default == DEFAULT_SCORE == "relative"


def test_train_default_decoder_size_is_the_library_default(tmp_path, encoder_file, demo_images):
    """No decoder flags: the small shape (models.decoder_sizes), recorded by name; --decoder-size reference is the
    paper's 12+4 shape; an unknown size is a one-line error before any work."""
    from dede_rt.models.decoder_sizes import DECODER_SIZES, DEFAULT_DECODER_SIZE

    assert DEFAULT_DECODER_SIZE == "small"
    data = _png_folder(tmp_path / "data", demo_images.images[:40])
    for size, flags in (("small", ()), ("reference", ("--decoder-size", "reference"))):
        out = tmp_path / size
        proc = run_cli("train", "--encoder", encoder_file, "--data", data, "--out", out, "--epochs", 1,
                       "--holdout", 0.25, "--quiet", "--score", "summed", *flags)
        assert proc.returncode == 0, proc.stderr
        info = json.loads(run_cli("info", out, "--json").stdout)
        assert {k: info["decoder"][k] for k in DECODER_SIZES[size]} == DECODER_SIZES[size]
        assert info["training"]["decoder_size"] == size
        assert f"decoder {size} patch 4" in run_cli("info", out).stdout
    assert_one_line_error(run_cli("train", "--encoder", encoder_file, "--data", data, "--out", tmp_path / "o",
                                  "--decoder-size", "huge"), "unknown decoder size 'huge'")
