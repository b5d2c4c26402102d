# Two entry points: `make demo` and `make test`. Both create .venv on first use
# and install the pinned dependencies (constraints.txt) into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo-output
EXTRAS ?= cpu,dev,ray,hf

# torchvision / timm / open_clip need a torchvision built for the installed torch, and PyPI's Linux torchvision
# wheels are CUDA builds: `make test-vision` runs the encoder-family tests in a second venv with torch 2.14.1 +
# torchvision 0.29.1 (CUDA builds, run on the CPU; ~5.5 GB) and the vision, timm and clip extras.
VISION_VENV  ?= .venv-vision
VISION_PY    := $(VISION_VENV)/bin/python
VISION_STAMP := $(VISION_VENV)/.installed
VISION_TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-vision install clean

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

$(VISION_STAMP): pyproject.toml constraints.txt
	test -x $(VISION_PY) || $(PYTHON) -m venv $(VISION_VENV)
	$(VISION_PY) -m pip install -q --upgrade pip
	# the project's pins, with this venv's torch pair (and the triton it wants) in place of the CPU torch's
	grep -v -e '^torch' -e '^triton' constraints.txt > $(VISION_VENV)/constraints.txt
	printf '%s\n' $(VISION_TORCH) >> $(VISION_VENV)/constraints.txt
	$(VISION_PY) -m pip install -q -c $(VISION_VENV)/constraints.txt $(VISION_TORCH)
	$(VISION_PY) -m pip install -q -c $(VISION_VENV)/constraints.txt -e '.[cpu,dev,hf,vision,timm,clip]'
	touch $(VISION_STAMP)

test-vision: $(VISION_STAMP)
	$(VISION_PY) -m pytest -q -rs tests/test_encoder_families.py tests/test_224px.py

clean:
	rm -rf $(VENV) $(VISION_VENV) $(DEMO_OUT) .pytest_cache
