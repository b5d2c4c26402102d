"""Importing the library stays cheap (GPU packages load only when a GPU path is used), it ships py.typed, and
without the optional ONNX stack the commands that need it say in one line which extra to install."""

import subprocess
import sys

import pytest


def test_imports_never_pull_gpu_packages():
    code = ("import sys, dede_rt; assert 'torch' not in sys.modules; "
            "import dede_rt.bundle, dede_rt.engines.registry, dede_rt.scan.pipeline, dede_rt.kernels, dede_rt.cli; "
            "heavy = [m for m in ('tensorrt', 'triton', 'pycuda', 'cuda', 'modelopt') if m in sys.modules]; "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_version_and_lazy_exports():
    import dede_rt

    from importlib.metadata import version

    assert dede_rt.__version__ == version("dede-rt")
    assert callable(dede_rt.load_detector) and callable(dede_rt.train_detector) and callable(dede_rt.scan)


def test_py_typed_ships_with_the_package():
    from pathlib import Path

    import dede_rt

    assert (Path(dede_rt.__file__).parent / "py.typed").is_file()


# Runs the CLI as if neither ONNX Runtime wheel (nor onnx/onnxscript) were installed: the base set.
WITHOUT_ONNX = ("import sys\n"
                "for name in ('onnxruntime', 'onnx', 'onnxscript'):\n"
                "    sys.modules[name] = None  # import fails, find_spec says absent\n"
                "from dede_rt.cli import main\n"
                "sys.argv = ['dede-rt', *sys.argv[1:]]\n"
                "main()\n")


@pytest.mark.parametrize("args", [("export", "{det}"), ("calibrate", "{det}", "--data", "{det}"), ("bench", "{det}"),
                                  ("scan", "{det}", "--detector", "{det}", "--backend", "onnxruntime")])
def test_without_onnxruntime_commands_that_need_it_say_what_to_install(tiny_detector_dir, args):
    argv = [a.format(det=tiny_detector_dir) for a in args]
    proc = subprocess.run([sys.executable, "-c", WITHOUT_ONNX, *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: ") and "'dede-rt[cpu]'" in lines[0] and "'dede-rt[gpu]'" in lines[0], lines


def test_without_onnxruntime_the_runner_and_onnx_encoders_raise_user_errors(monkeypatch, tmp_path):
    from dede_rt.engines.onnxruntime_runner import OnnxRuntimeRunner
    from dede_rt.errors import UserError
    from dede_rt.models.encoders import OnnxBackbone

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UserError, match=r"onnxruntime, not installed here: pip install 'dede-rt\[cpu\]'"):
        OnnxRuntimeRunner(tmp_path / "detector.onnx", 32).activate()
    with pytest.raises(UserError, match="an ONNX encoder needs onnxruntime"):
        OnnxBackbone(tmp_path / "encoder.onnx")
