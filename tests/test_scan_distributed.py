"""The distributed scan (`dede-rt scan --ray`): same rows as the local scan, exactly once, resumable.

One local Ray cluster (``ray.init(num_cpus=2)``) serves the whole module; the
kill-and-resume driver runs as a subprocess connected to it.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dede_rt.errors import UserError
from dede_rt.scan.output import read_rows as read_local_rows
from dede_rt.scan.partitions import complete_partitions, part_name, plan

HAS_RAY = True
try:
    import ray  # noqa: F401
    import ray.data  # noqa: F401
except ImportError:
    HAS_RAY = False
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="ray[data] is not installed: pip install 'dede-rt[ray]'")

N_PNG = 150
SMALL = {"cpus_per_actor": 1.0, "decode_cpus": 1.0, "actors": 1, "backend": "torch", "threads": 1,
         "progress": False}


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images(demo_images) -> np.ndarray:
    return demo_images.images[:N_PNG]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory, images: np.ndarray) -> Path:
    """150 PNGs in two class folders, three broken files and a WebDataset shard of 12 members (+ a .cls)."""
    root = tmp_path_factory.mktemp("dist_images")
    for i, image in enumerate(images[:138]):
        sub = root / f"class{i % 2}"
        sub.mkdir(exist_ok=True)
        (sub / f"{i:04d}.png").write_bytes(_png(image))
    (root / "class0" / "broken.png").write_bytes(b"not a png at all")
    (root / "class1" / "empty.jpg").write_bytes(b"")
    (root / "class1" / "truncated.png").write_bytes(_png(images[0])[:60])
    with tarfile.open(root / "shard-000.tar", "w") as tar:
        for i, image in enumerate(images[138:150]):
            for name, data in ((f"{i:04d}.png", _png(image)), (f"{i:04d}.cls", b"3")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (start/stop costs seconds)."""
    if not HAS_RAY:
        pytest.skip("ray[data] is not installed: pip install 'dede-rt[ray]'")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    from ray.data import DataContext

    # A scan that waits on resources an earlier test still holds must fail here, not after Ray's 30 minutes.
    DataContext.get_current().execution_no_progress_timeout_s = 240
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory: pytest.TempPathFactory, image_dir: Path, tiny_detector_dir: Path) -> dict:
    from dede_rt.scan.pipeline import run_scan

    out = tmp_path_factory.mktemp("local") / "scan.parquet"
    summary = run_scan(image_dir, tiny_detector_dir, out, progress=False, backend="torch", threads=1, workers=1)
    return {"rows": list(read_local_rows(out)), "summary": summary}


def _same_rows(got: list, want: list) -> None:
    assert len(got) == len(want)
    assert [(r.index, r.path, r.member, r.error, r.flagged) for r in got] == \
           [(r.index, r.path, r.member, r.error, r.flagged) for r in want]
    a = np.array([np.nan if r.score is None else r.score for r in got])
    b = np.array([np.nan if r.score is None else r.score for r in want])
    np.testing.assert_allclose(a, b, rtol=1e-6, equal_nan=True)


# ---- no Ray needed ----


def test_plan_follows_the_local_scan_order_and_cuts_shards_out(image_dir: Path, tmp_path: Path) -> None:
    kind, parts, sha = plan(str(image_dir), str(tmp_path), 50)
    assert kind == "folder"
    assert [p.kind for p in parts] == ["tar", "lines", "lines", "lines"]  # root files come before sub-folders
    assert [p.count for p in parts] == [None, 50, 50, 41]
    again = plan(str(image_dir), str(tmp_path), 50, listing_to=str(tmp_path / "again.jsonl"))[2]
    assert again == sha and plan(str(image_dir), str(tmp_path), 40, listing_to=str(tmp_path / "c.jsonl"))[2] != sha
    from dede_rt.scan.partitions import partition_items
    from dede_rt.data.sources import open_source

    ours = [item.key for p in parts for item in partition_items(p)]
    assert ours == [item.key for item in open_source(image_dir).items()]


def test_a_partition_is_complete_only_with_all_chunks_and_its_last(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dede_rt.scan.partitions import Partition

    parts = [Partition(i, "lines", "x", count=2) for i in range(4)]
    table = pa.table({"offset": [0]})
    for partition, chunk, last in ((0, 0, False), (0, 1, True), (1, 0, False), (2, 0, True), (3, 0, False),
                                   (3, 1, True)):
        pq.write_table(table, tmp_path / part_name(partition, chunk, last))
    (tmp_path / part_name(3, 1, True)).write_bytes(b"PAR1 torn")  # killed mid-write
    done, stale = complete_partitions(str(tmp_path), parts)
    assert sorted(done) == [0]  # 1: no last chunk; 2: one row of the two it lists; 3: torn part
    assert sorted(Path(f).name for f in stale) == sorted(
        [part_name(1, 0, False), part_name(2, 0, True), part_name(3, 0, False), part_name(3, 1, True)])


def test_dede_rt_and_the_local_scan_never_import_ray(image_dir: Path, tiny_detector_dir: Path, tmp_path: Path) -> None:
    code = ("import sys, dede_rt, dede_rt.cli, dede_rt.scan.distributed\n"
            "from dede_rt.scan.pipeline import run_scan\n"
            f"run_scan({str(image_dir / 'class0')!r}, {str(tiny_detector_dir)!r}, {str(tmp_path / 'o.csv')!r}, "
            "progress=False, backend='torch', threads=1)\n"
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]


def test_without_ray_the_cli_says_what_to_install(image_dir: Path, tiny_detector_dir: Path, tmp_path: Path) -> None:
    code = ("import sys; sys.modules['ray'] = None\n"  # as if ray were not installed
            "from dede_rt.cli import main\n"
            f"sys.argv = ['dede-rt', 'scan', {str(image_dir)!r}, '--detector', {str(tiny_detector_dir)!r}, "
            f"'-o', {str(tmp_path / 'out')!r}, '--ray', 'auto']\n"
            "main()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --ray needs Ray Data, not installed here: pip install 'dede-rt[ray]'"]


def test_worker_refuses_a_bundle_that_is_not_the_drivers(tiny_detector_dir: Path) -> None:
    from dede_rt.scan.distributed import _pack_bundle, _worker_bundle, bundle_digest

    digest = bundle_digest(tiny_detector_dir)
    assert _worker_bundle(str(tiny_detector_dir), digest, None) == tiny_detector_dir
    with pytest.raises(RuntimeError, match="differs from the driver's"):
        _worker_bundle(str(tiny_detector_dir), "0" * 64, None)
    with pytest.raises(RuntimeError, match="does not match its digest"):
        _worker_bundle("/nonexistent/bundle", "0" * 64, _pack_bundle(tiny_detector_dir))
    shipped = _worker_bundle("/nonexistent/bundle", digest, _pack_bundle(tiny_detector_dir))
    assert bundle_digest(shipped) == digest


# ---- on the module's Ray cluster ----


@needs_ray
def test_distributed_equals_local_with_error_rows(cluster, image_dir, tiny_detector_dir, local_rows, tmp_path) -> None:
    from dede_rt.scan.distributed import read_rows, run

    out = tmp_path / "dist.parquet"
    summary = run(image_dir, tiny_detector_dir, out, partition_size=50, **SMALL)
    assert summary["status"] == "complete"
    rows = list(read_rows(out))
    _same_rows(rows, local_rows["rows"])
    errors = {Path(r.path).name: r.error for r in rows if r.error}
    assert set(errors) == {"broken.png", "empty.jpg", "truncated.png"}
    want = local_rows["summary"]
    assert summary["counts"] == want["counts"] == {"inputs": 153, "scored": 150, "flagged": want["counts"]["flagged"],
                                                   "errors": 3}
    assert summary["threshold"] == pytest.approx(want["threshold"], rel=1e-12)
    assert summary["histogram"]["counts"] == want["histogram"]["counts"]
    # the local Parquet output keeps 9 significant digits of a score (its CSV journal): edges agree to ~3e-9
    np.testing.assert_allclose(summary["histogram"]["edges"], want["histogram"]["edges"], rtol=1e-6)
    assert Path(summary["histogram_png"]).stat().st_size > 1000
    assert json.loads(Path(summary["summary_json"]).read_text())["status"] == "complete"
    assert sorted(p.name for p in out.glob("part-*")) == [part_name(i, 0, True) for i in range(4)]

    with pytest.raises(UserError, match="--resume"):
        run(image_dir, tiny_detector_dir, out, partition_size=50, **SMALL)
    again = run(image_dir, tiny_detector_dir, out, resume=True, **SMALL)  # all complete: nothing to do
    assert again["ray"]["submitted"] == 0 and again["counts"] == summary["counts"]
    with pytest.raises(UserError, match="options changed"):
        run(image_dir, tiny_detector_dir, out, resume=True, **{**SMALL, "fpr": 0.05})


@needs_ray
def test_parquet_table_source_over_a_pyarrow_filesystem(cluster, images, tiny_detector_dir, tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dede_rt.scan.distributed import read_rows, run
    from dede_rt.scan.pipeline import scan

    blobs = [_png(im) for im in images[:40]] + [None, b"junk"]
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(len(blobs))], "image": pa.array(blobs, pa.binary())}),
                   tmp_path / "table.parquet", row_group_size=16)
    out = f"file://{tmp_path}/dist.parquet"
    summary = run(f"file://{tmp_path}/table.parquet", tiny_detector_dir, out, **SMALL)
    assert summary["source_kind"] == "table" and summary["ray"]["partitions"] == 3  # row groups of 16
    rows = list(read_rows(out))
    assert [r.member for r in rows] == [str(i) for i in range(42)]
    assert rows[40].error == "ValueError: no image bytes (null)" and rows[41].error.startswith("UnidentifiedImageError")
    for i, im in enumerate(images[:40]):
        (tmp_path / "png").mkdir(exist_ok=True)
        (tmp_path / "png" / f"{i:04d}.png").write_bytes(blobs[i])
    local = list(scan(tmp_path / "png", tiny_detector_dir, backend="torch", threads=1, workers=1))
    np.testing.assert_allclose([r.score for r in rows[:40]], [r.score for r in local], rtol=1e-6)


@needs_ray
def test_kill_driver_then_resume_equals_uninterrupted(cluster, tmp_path, images, tiny_detector_dir) -> None:
    from dede_rt.scan.distributed import read_rows
    from dede_rt.scan.pipeline import scan

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(600):
        (src / f"{i:04d}.png").write_bytes(_png(images[rng.integers(len(images))]))
    (src / "0300-broken.png").write_bytes(b"broken")
    out = tmp_path / "killed.parquet"
    cmd = [sys.executable, "-m", "dede_rt.cli", "scan", str(src), "--detector", str(tiny_detector_dir), "-o",
           str(out), "--ray", cluster, "--ray-partition-size", "10", "--ray-actors", "1", "--backend", "torch",
           "--threads", "1", "--quiet"]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and len(list(out.glob("part-*-last.parquet"))) < 5:
        assert driver.poll() is None, driver.communicate()[1].decode()[-2000:]
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    parts_at_kill = len(list(out.glob("part-*-last.parquet")))
    assert 5 <= parts_at_kill < 61, parts_at_kill  # killed mid-scan
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode in (0, 1), again.stderr[-3000:]
    summary = json.loads(out.with_name("killed.summary.json").read_text())
    assert summary["status"] == "complete" and summary["ray"]["skipped_complete"] >= 5
    assert summary["counts"]["inputs"] == 601 and summary["counts"]["errors"] == 1
    rows = list(read_rows(out))
    _same_rows(rows, list(scan(src, tiny_detector_dir, backend="torch", threads=1, workers=1)))
    assert len({r.key for r in rows}) == 601  # no duplicates, no gaps


@needs_ray
def test_a_crashed_actor_is_restarted_and_its_chunk_retried(cluster, image_dir, tiny_detector_dir, local_rows,
                                                            tmp_path) -> None:
    from dede_rt.scan.distributed import read_rows, run

    out = tmp_path / "crash.parquet"
    fault = {"partition": 1, "mode": "crash", "marker": str(tmp_path / "markers")}
    summary = run(image_dir, tiny_detector_dir, out, partition_size=50, max_restarts=2, max_task_retries=2,
                  _fault=fault, **SMALL)
    assert (tmp_path / "markers" / "crashed-1-0").exists()  # it did crash
    assert summary["status"] == "complete"
    _same_rows(list(read_rows(out)), local_rows["rows"])


@needs_ray
def test_a_partition_that_keeps_failing_is_left_for_resume(cluster, image_dir, tiny_detector_dir, local_rows,
                                                            tmp_path) -> None:
    from dede_rt.scan.distributed import read_rows, run

    out = tmp_path / "failing.parquet"
    fault = {"partition": 2, "mode": "raise"}
    with pytest.raises(UserError, match="injected failure on partition 2.*--resume"):
        run(image_dir, tiny_detector_dir, out, partition_size=50, _fault=fault, **SMALL)  # default: stop
    summary = run(image_dir, tiny_detector_dir, out, resume=True, max_failed_partitions=1, _fault=fault, **SMALL)
    assert summary["status"] == "incomplete" and summary["ray"]["incomplete_partitions"] == [2]
    failure, = summary["ray"]["failures"]
    assert failure["partition"] == 2 and "injected failure" in failure["failure_detail"]
    assert not list(out.glob("part-00000002-*"))
    final = run(image_dir, tiny_detector_dir, out, resume=True, **SMALL)
    assert final["status"] == "complete" and final["ray"]["submitted"] == 1
    _same_rows(list(read_rows(out)), local_rows["rows"])
