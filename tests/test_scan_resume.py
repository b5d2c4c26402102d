"""Kill-and-resume: a SIGKILLed `dede-rt scan` continued with --resume equals an uninterrupted scan."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dede_rt.errors import UserError
from dede_rt.scan.output import read_rows, sidecar_paths
from dede_rt.scan.pipeline import run_scan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_IMAGES = 240



@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume_images")
    rng = np.random.default_rng(3)
    for i in range(N_IMAGES):
        sub = root / f"class{i % 3}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(sub / f"{i:05d}.png")
    (root / "class1" / "broken.png").write_bytes(b"not a png")
    return root


def _rows(path: Path) -> list[tuple]:
    return [(r.index, r.path, r.member, r.score, r.flagged, r.error) for r in read_rows(path)]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from dede_rt.cli import main; main()", "scan", *args]


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_sigkill_then_resume_equals_uninterrupted(image_dir, tiny_detector_dir, tmp_path):
    reference = tmp_path / "reference.csv"
    run_scan(image_dir, tiny_detector_dir, reference, progress=False, backend="torch", batch_size=1, workers=1)

    out = tmp_path / "killed.csv"
    args = _cli(str(image_dir), "--detector", str(tiny_detector_dir), "--output", str(out), "--backend", "torch",
                "--batch-size", "1", "--workers", "1", "--threads", "1", "--quiet")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    while _count_lines(out) < 1 + 30 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"scan ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = _count_lines(out) - 1
    assert 30 <= done_before < N_IMAGES + 1, done_before
    summary_path, _ = sidecar_paths(out)
    import json

    assert json.loads(summary_path.read_text())["status"] == "running"  # written atomically at start
    with open(out, "ab") as fh:  # a torn last line, as if the kernel stopped mid-write
        fh.write(b"999,/torn/row.png,,12")

    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode in (0, 1), resumed.stderr
    assert _rows(out) == _rows(reference)  # same rows, same scores, same order: no gaps, no duplicates
    assert len(_rows(out)) == N_IMAGES + 1
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "complete" and summary["resumed_from"] == done_before
    assert summary["counts"] == {"inputs": N_IMAGES + 1, "scored": N_IMAGES, "flagged": summary["counts"]["flagged"],
                                 "errors": 1}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_limit_then_resume_other_formats(image_dir, tiny_detector_dir, tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow", reason="Parquet output needs the 'parquet' extra (pyarrow)")
    opts = dict(progress=False, backend="torch", batch_size=16, workers=1, threshold=6500.0)
    data = image_dir / "class1"  # N_IMAGES / 3 images and broken.png
    full = tmp_path / f"full{suffix}"
    run_scan(data, tiny_detector_dir, full, **opts)
    part = tmp_path / f"part{suffix}"
    first = run_scan(data, tiny_detector_dir, part, limit=37, **opts)
    assert first["counts"]["inputs"] == 37
    with pytest.raises(UserError, match="already exists"):
        run_scan(data, tiny_detector_dir, part, **opts)
    second = run_scan(data, tiny_detector_dir, part, resume=True, **opts)
    assert second["resumed_from"] == 37 and second["this_run"]["inputs"] == N_IMAGES // 3 + 1 - 37
    assert _rows(part) == _rows(full)
    flagged = sum(bool(r[4]) for r in _rows(full))
    assert 0 < flagged < N_IMAGES // 3 and second["counts"]["flagged"] == flagged


def test_resume_refuses_changed_dataset_or_threshold(image_dir, tiny_detector_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(image_dir / "class0", data)
    out = tmp_path / "scan.csv"
    run_scan(data, tiny_detector_dir, out, limit=20, progress=False, backend="torch", batch_size=8, workers=0)
    with pytest.raises(UserError, match="threshold"):
        run_scan(data, tiny_detector_dir, out, resume=True, threshold=1.0, progress=False, backend="torch")
    os.remove(sorted(data.iterdir())[5])
    with pytest.raises(UserError, match="dataset changed"):
        run_scan(data, tiny_detector_dir, out, resume=True, progress=False, backend="torch", batch_size=8)
