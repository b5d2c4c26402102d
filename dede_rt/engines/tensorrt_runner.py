"""TensorRT runtime: deserialize an engine built by ``dede-rt build-engine`` and score uint8 batches on the GPU.

The engine's input is the float NCHW [0, 1] variant of the fused graph
(``detector_nchw*.onnx``); the uint8 -> float / NHWC -> NCHW step runs in torch
on the same CUDA stream (TensorRT restricts UINT8 tensors, and the step is one
cheap element-wise kernel). Buffers are torch CUDA tensors; host staging uses
pinned memory; ``infer_many`` double-buffers copies against compute on two
streams. TensorRT is imported only when a runner is activated.

API (TensorRT >= 10, name-based I/O): ``Runtime.deserialize_cuda_engine``,
``engine.num_io_tensors / get_tensor_name / get_tensor_mode``,
``context.set_input_shape``, ``context.set_tensor_address``,
``context.execute_async_v3(stream)``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from dede_rt.engines.base import BaseRunner
from dede_rt.errors import IntegrityError, UserError

INSTALL_HINT = "pip install 'dede-rt[trt]' (TensorRT >= 10) on a machine with an NVIDIA GPU and a CUDA build of torch"


def tensorrt_status() -> tuple[bool, str]:
    """(usable, one-line reason): TensorRT importable and a CUDA GPU visible to torch."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, f"TensorRT is not installed here; {INSTALL_HINT}"
    import torch

    if not torch.cuda.is_available():
        return False, f"TensorRT {trt.__version__} is installed but torch sees no CUDA GPU; {INSTALL_HINT}"
    major = int(trt.__version__.split(".")[0])
    if major < 10:
        return False, f"TensorRT {trt.__version__} is too old (need >= 10 for the name-based I/O API); {INSTALL_HINT}"
    return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name(0)}"


def gpu_identity() -> dict:
    """This machine's GPU name, compute capability and TensorRT version (what an engine is tied to)."""
    import tensorrt as trt
    import torch

    cc = torch.cuda.get_device_capability(0)
    return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(0), "compute_capability": f"{cc[0]}.{cc[1]}"}


def engine_compatible(manifest: dict) -> tuple[bool, str]:
    """Whether an engine (by its JSON manifest) was built for this GPU and TensorRT version."""
    ok, why = tensorrt_status()
    if not ok:
        return False, why
    here = gpu_identity()
    for key in ("tensorrt", "compute_capability", "gpu"):
        if manifest.get(key) != here[key]:
            return False, (f"engine was built for {key} {manifest.get(key)!r}, this machine has {here[key]!r}; "
                           f"rebuild it here with `dede-rt build-engine`")
    return True, "ok"


def read_engine_manifest(engine_path: str | Path) -> dict:
    """The JSON manifest written next to an engine (``<engine>.json``)."""
    path = Path(str(engine_path) + ".json")
    if not path.is_file():
        raise UserError(f"{engine_path}: no engine manifest {path.name}; rebuild with `dede-rt build-engine`")
    return json.loads(path.read_text())


def register_engine_plugins(manifest: dict, engine_path: str | Path = "engine") -> bool:
    """Register the mask-and-score plugins before deserializing an engine whose manifest says it uses them.

    An AOT engine carries its kernels and needs no Python plugin, so registering is only attempted (and a
    failure is then harmless); a JIT engine cannot run without it. Returns whether the plugins are registered.
    """
    tail = manifest.get("score_tail", {})
    if tail.get("used") != "plugin":
        return False
    from dede_rt.kernels.trt_plugin import plugin_status, register_plugins

    ok, why, _ = plugin_status()
    if ok:
        register_plugins()
        return True
    if not tail.get("aot", False):
        raise UserError(f"{engine_path}: built with the Python (JIT) mask-and-score plugin, unavailable here ({why}); "
                        "rebuild with `dede-rt build-engine --score-tail standard` or install triton")
    return False


class TensorRTRunner(BaseRunner):
    """Scores uint8 NHWC batches with a serialized TensorRT engine on CUDA."""

    backend = "tensorrt"

    def __init__(self, engine_path: str | Path, image_size: int, precision: str = "fp16",
                 batch_size: int | None = None) -> None:
        super().__init__(image_size, precision=precision, device="cuda")
        self.engine_path = Path(engine_path)
        self.batch_size = batch_size
        self.last_gpu_time: float | None = None

    def activate_impl(self) -> None:
        ok, why = tensorrt_status()
        if not ok:
            raise UserError(why)
        import tensorrt as trt
        import torch

        manifest = read_engine_manifest(self.engine_path)
        ok, why = engine_compatible(manifest)
        if not ok:
            raise IntegrityError(f"{self.engine_path}: {why}")
        self.manifest = manifest
        register_engine_plugins(manifest, self.engine_path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise IntegrityError(f"{self.engine_path}: TensorRT could not deserialize the engine (corrupt file?)")
        # One execution context per stream: a context's scratch memory must not be shared by in-flight batches.
        self._contexts = [self.engine.create_execution_context(), self.engine.create_execution_context()]
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise UserError(f"{self.engine_path}: expected one input and one output, found {inputs} -> {outputs}")
        self._input, self._output = inputs[0], outputs[0]
        self._in_dtype = _torch_dtype(self.engine.get_tensor_dtype(self._input))
        self._out_dtype = _torch_dtype(self.engine.get_tensor_dtype(self._output))
        self._max_batch = int(manifest["profile"]["max"])
        self._streams = [torch.cuda.Stream(), torch.cuda.Stream()]
        self._events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(2)]
        self._host: list = [None, None]  # pinned staging buffers, grown on demand

    def _pinned(self, slot: int, images_u8: np.ndarray):
        import torch

        buf = self._host[slot]
        if buf is None or buf.shape[0] < len(images_u8):
            buf = torch.empty((max(len(images_u8), self.batch_size or 0), *images_u8.shape[1:]), dtype=torch.uint8,
                              pin_memory=True)
            self._host[slot] = buf
        view = buf[: len(images_u8)]
        view.numpy()[...] = images_u8
        return view

    def _enqueue(self, images_u8: np.ndarray, slot: int):
        """Copy, convert and run one batch on stream ``slot``; returns (scores on device, events)."""
        import torch

        n = len(images_u8)
        if n > self._max_batch:
            raise UserError(f"batch of {n} exceeds the engine's profile maximum {self._max_batch}")
        stream = self._streams[slot]
        start, end = self._events[slot]
        host = self._pinned(slot, images_u8)
        with torch.cuda.stream(stream):
            u8 = host.to("cuda", non_blocking=True)
            x = u8.permute(0, 3, 1, 2).to(self._in_dtype).div_(255.0).contiguous()
            out = torch.empty((n,), dtype=self._out_dtype, device="cuda")
            context = self._contexts[slot]
            context.set_input_shape(self._input, tuple(x.shape))
            context.set_tensor_address(self._input, x.data_ptr())
            context.set_tensor_address(self._output, out.data_ptr())
            start.record(stream)
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"{self.engine_path}: TensorRT execution failed")
            end.record(stream)
            scores = out.float().to("cpu", non_blocking=True)
        return scores, stream, x, out  # keep x/out alive until the stream is done

    def infer_impl(self, images_u8: np.ndarray) -> np.ndarray:
        scores, stream, *_ = self._enqueue(images_u8, 0)
        stream.synchronize()
        start, end = self._events[0]
        self.last_gpu_time = start.elapsed_time(end) / 1e3
        return scores.numpy().copy()

    def infer_many(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Scores per batch, double-buffered: batch k+1 is staged and enqueued while batch k runs."""
        if not self.is_active:
            raise RuntimeError(f"runner {self.name} is not active; use it as a context manager")
        pending = None
        for k, batch in enumerate(batches):
            current = self._enqueue(np.ascontiguousarray(batch), k % 2)
            if pending is not None:
                pending[1].synchronize()
                yield pending[0].numpy().copy()
            pending = current
        if pending is not None:
            pending[1].synchronize()
            yield pending[0].numpy().copy()

    def deactivate_impl(self) -> None:
        self._contexts = []
        self.engine = None
        self._runtime = None
        self._host = [None, None]


def _torch_dtype(trt_dtype):
    import tensorrt as trt
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.UINT8: torch.uint8, trt.DataType.INT8: torch.int8}
    if trt_dtype not in table:
        raise UserError(f"unsupported engine I/O dtype {trt_dtype}")
    return table[trt_dtype]
