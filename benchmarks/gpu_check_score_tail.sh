#!/usr/bin/env bash
# GPU check of the fused mask-and-score tail in the product path: TensorRT engines with the dede_rt::MaskAndScore[Head]
# plugin (build-engine --score-tail plugin) and the torch backend's Triton kernel (--score-kernel triton).
# Needs a CUDA GPU, TensorRT >= 10.8 (tensorrt.plugin; AOT kernels need aot_impl) and triton. ~10 min on one GPU.
#   bash benchmarks/gpu_check_score_tail.sh            (results under benchmarks/results/gpu_score_tail/)
set -euo pipefail
PY=${PY:-python}
OUT=${OUT:-benchmarks/results/gpu_score_tail}
mkdir -p "$OUT"
unset TRITON_INTERPRET  # real CUDA kernels, not the CPU interpreter
$PY -c "from dede_rt.kernels.trt_plugin import plugin_status; from dede_rt.engines.tensorrt_runner import tensorrt_status; print('tensorrt:', tensorrt_status()); print('plugin:', plugin_status())" | tee "$OUT/status.txt"
# Correctness: plugin engines (AOT + JIT, both pixel layouts) vs the reference op; fp32/fp16/int8 engines with the
# standard and the plugin tail vs ONNX Runtime; the Triton kernels on CUDA, also through make_runner.
$PY -m pytest -q -rs -p no:cacheprovider tests/test_kernels_trt.py tests/test_engines_tensorrt.py \
    tests/test_kernels_triton.py 2>&1 | tee "$OUT/pytest.txt"
# Speed, side by side: torch plain ops vs the Triton kernel; TensorRT standard-op vs plugin-tail engines.
$PY -m dede_rt.cli bench --workdir "$OUT/work" --batch-sizes 64,256 --backends torch:fp32,tensorrt:fp32,tensorrt:fp16 \
    --score-kernel triton --score-tail standard,plugin --seconds 1 --rounds 2 \
    --json "$OUT/bench.json" --markdown "$OUT/bench.md" | tee "$OUT/bench_table.md"
