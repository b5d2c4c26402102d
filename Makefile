# Two entry points: `make demo` and `make test`. Both create .venv on first use
# and install the pinned dependencies (constraints.txt) into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo-output
EXTRAS ?= cpu,dev,ray,hf

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and exact: the CPU build; anything looser pulls a CUDA wheel.
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	# cpu: ONNX export + ONNX Runtime (CPU wheel; never together with gpu's onnxruntime-gpu);
	# dev: pytest, pyarrow, build, Triton's CPU interpreter; ray: the Ray Data tests; hf: Hugging Face CLIP
	# encoders (torchvision/timm/open_clip are left out: PyPI's torchvision is a CUDA build).
	$(PY) -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dede-rt demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
