"""Importing the library stays cheap: GPU packages load only when a GPU path is used."""

import subprocess
import sys


def test_imports_never_pull_gpu_packages():
    code = ("import sys, dede_rt; assert 'torch' not in sys.modules; "
            "import dede_rt.bundle, dede_rt.engines.registry, dede_rt.scan.pipeline, dede_rt.kernels, dede_rt.cli; "
            "heavy = [m for m in ('tensorrt', 'triton', 'pycuda', 'cuda', 'modelopt') if m in sys.modules]; "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_version_and_lazy_exports():
    import dede_rt

    assert dede_rt.__version__ == "0.1.0"
    assert callable(dede_rt.load_detector) and callable(dede_rt.train_detector) and callable(dede_rt.scan)
