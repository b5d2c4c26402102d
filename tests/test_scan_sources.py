"""Scan sources (folder, path list, NPZ, CIFAR, tar shards), the bounded decode pool, output files and the CLI."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dede_rt.bundle import load_detector
from dede_rt.errors import UserError
from dede_rt.scan.decode import DecodePool
from dede_rt.scan.output import read_rows, sidecar_paths
from dede_rt.scan.pipeline import run_scan
from dede_rt.data.sources import Item, expand_braces, open_source

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def arrays() -> np.ndarray:
    return np.random.default_rng(11).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def _write_shard(path: Path, images: np.ndarray, start: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i, image in enumerate(images):
            for name, data in ((f"{start + i:06d}.png", _png(image)), (f"{start + i:06d}.cls", b"3"),
                               (f"{start + i:06d}.json", b"{}")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("._000000.png")  # macOS metadata: hidden, skipped
        info.size = 3
        tar.addfile(info, io.BytesIO(b"xyz"))


def _scores(source, detector_dir, **kw):
    from dede_rt.scan import scan

    return list(scan(source, detector_dir, backend="torch", batch_size=8, workers=1, **kw))


def test_npz_nhwc_and_nchw_float(tmp_path, arrays, tiny_detector_dir):
    expected = load_detector(tiny_detector_dir).score(arrays)
    np.savez(tmp_path / "u8.npz", x=arrays, y=np.arange(20))
    np.savez_compressed(tmp_path / "f.npz", images=arrays.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    for name in ("u8.npz", "f.npz"):
        rows = _scores(tmp_path / name, tiny_detector_dir)
        assert [r.member for r in rows] == [str(i) for i in range(20)]
        np.testing.assert_allclose([r.score for r in rows], expected, rtol=1e-5)
    assert open_source(tmp_path / "u8.npz").count() == 20
    import dede_rt

    rows = list(dede_rt.scan(tmp_path / "u8.npz", tiny_detector_dir, backend="torch", limit=5))  # the API
    assert [r.member for r in rows] == ["0", "1", "2", "3", "4"]


def test_cifar_batches_and_resized_arrays(tmp_path, arrays, tiny_detector_dir):
    batch = {b"data": arrays.transpose(0, 3, 1, 2).reshape(20, -1), b"labels": list(range(20))}
    (tmp_path / "cifar").mkdir()
    with open(tmp_path / "cifar" / "data_batch_1", "wb") as fh:
        pickle.dump(batch, fh)
    (tmp_path / "cifar" / "data_batch_2").write_bytes(b"torn pickle")  # broken batch file: one error row
    rows = _scores(tmp_path / "cifar", tiny_detector_dir)
    assert len(rows) == 21 and rows[3].path.endswith("data_batch_1") and rows[3].member == "3"
    assert rows[20].path.endswith("data_batch_2") and "CIFAR" in rows[20].error
    rows = rows[:20]
    np.testing.assert_allclose([r.score for r in rows], load_detector(tiny_detector_dir).score(arrays), rtol=1e-5)
    big = np.repeat(np.repeat(arrays[:4], 2, axis=1), 2, axis=2)  # 64 px arrays: resized like training sets
    np.savez(tmp_path / "big.npz", x=big)
    assert all(r.error is None for r in _scores(tmp_path / "big.npz", tiny_detector_dir))


def test_tar_shards_path_list_and_folder_of_shards(tmp_path, arrays, tiny_detector_dir):
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "train-000.tar", arrays[:12], 0)
    _write_shard(shards / "train-001.tar", arrays[12:], 12)
    expected = load_detector(tiny_detector_dir).score(arrays)
    pattern = str(shards / "train-{000..001}.tar")
    assert expand_braces(pattern) == [str(shards / "train-000.tar"), str(shards / "train-001.tar")]
    for source in (pattern, shards):  # brace pattern, and a folder whose .tar files are expanded
        rows = _scores(source, tiny_detector_dir)
        assert [r.member for r in rows] == [f"{i:06d}.png" for i in range(20)]
        assert rows[12].path.endswith("train-001.tar")
        np.testing.assert_allclose([r.score for r in rows], expected, rtol=1e-5)
    # a torn shard: its readable members are scored, then one error row, and the scan goes on
    data = (shards / "train-000.tar").read_bytes()
    (tmp_path / "torn.tar").write_bytes(data[: len(data) // 2 + 100])
    rows = _scores(tmp_path / "torn.tar", tiny_detector_dir)
    assert rows[-1].error and all(r.error is None for r in rows[:-1]) and len(rows) >= 2
    (shards / "train-002.tar").write_bytes(b"\x1f\x8b garbage")  # unreadable shard inside a folder: an error row
    rows = _scores(shards, tiny_detector_dir)
    assert len(rows) == 21 and "tar shard" in rows[-1].error
    (shards / "train-002.tar").unlink()

    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(_png(arrays[i]))
    listing = tmp_path / "list.txt"
    listing.write_text("# three images and a missing one\nimgs/2.png\n\nimgs/0.png\nimgs/missing.png\nimgs/1.png\n")
    rows = _scores(listing, tiny_detector_dir)
    assert [Path(r.path).name for r in rows] == ["2.png", "0.png", "missing.png", "1.png"]
    assert rows[2].error and "FileNotFound" in rows[2].error
    np.testing.assert_allclose([rows[i].score for i in (1, 3, 0)], expected[:3], rtol=1e-5)


def test_decode_pool_is_bounded_and_ordered():
    pulled = 0

    def items():
        nonlocal pulled
        for i in range(2000):
            pulled += 1
            yield Item(f"a{i}", str(i), np.full((32, 32, 3), i % 256, np.uint8))

    with DecodePool(32, workers=2, chunk=8, prefetch=4) as pool:
        for consumed, (item, image, error) in enumerate(pool.map(items()), start=1):
            assert error is None and item.member == str(consumed - 1) and image[0, 0, 0] == (consumed - 1) % 256
            assert pulled - consumed <= 8 * 4 + 8  # never more than the window ahead of the consumer
    assert consumed == 2000


def test_output_files_summary_and_histogram(tmp_path, arrays, tiny_detector_dir):
    np.savez(tmp_path / "x.npz", x=arrays)
    out = tmp_path / "res" / "scan.csv"
    threshold = float(np.median(load_detector(tiny_detector_dir).score(arrays)))
    summary = run_scan(tmp_path / "x.npz", tiny_detector_dir, out, threshold=threshold, progress=False,
                       backend="torch", batch_size=6, workers=1)
    rows = list(read_rows(out))
    assert [r.index for r in rows] == list(range(20))
    assert sum(r.flagged for r in rows) == summary["counts"]["flagged"] == 10
    summary_path, png = sidecar_paths(out)
    on_disk = json.loads(summary_path.read_text())
    assert on_disk["status"] == "complete" and on_disk["threshold"] == threshold and on_disk["target_fpr"] is None
    assert on_disk["backend"] == "torch" and on_disk["precision"] == "fp32" and "torch" in on_disk["versions"]
    assert sum(on_disk["histogram"]["counts"]) == 20 and on_disk["this_run"]["images_per_second"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0.0 <= on_disk["calibration_fpr"] <= 1.0
    with pytest.raises(UserError, match="either"):
        run_scan(tmp_path / "x.npz", tiny_detector_dir, threshold=1.0, fpr=0.01, progress=False)
    with pytest.raises(UserError, match=r"\.csv, \.jsonl or \.parquet"):
        run_scan(tmp_path / "x.npz", tiny_detector_dir, tmp_path / "out.xlsx", progress=False)


def test_cli_exit_codes(tmp_path, arrays, tiny_detector_dir, monkeypatch):
    from dede_rt.cli import app

    np.savez(tmp_path / "x.npz", x=arrays[:6])
    runner = CliRunner()
    base = ["scan", str(tmp_path / "x.npz"), "--detector", str(tiny_detector_dir), "--backend", "torch", "--quiet"]
    clean = runner.invoke(app, base + ["--threshold", "1e12"])
    assert clean.exit_code == 0, clean.output
    assert "6 inputs: 0 flagged" in clean.output
    flagged = runner.invoke(app, base + ["--threshold", "0", "--limit", "4"])
    assert flagged.exit_code == 1 and flagged.output.count("FLAGGED") == 4, flagged.output
    from dede_rt.engines.torch_runner import TorchRunner

    def broken_infer(self, images):
        raise RuntimeError("device lost")

    monkeypatch.setattr(TorchRunner, "infer_impl", broken_infer)
    crashed = runner.invoke(app, base + ["--output", str(tmp_path / "crash.csv")])
    assert crashed.exit_code == 2 and "device lost" in crashed.output  # never 1, which means "flagged"
    monkeypatch.undo()
    missing = subprocess.run([sys.executable, "-c", "from dede_rt.cli import main; main()", "scan", str(tmp_path),
                              "--detector", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "not a detector bundle" in missing.stderr
