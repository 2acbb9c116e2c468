# The two commands of the README. Both set themselves up: a missing .venv is
# created and the project installed with the pinned versions of
# constraints.txt; a second call reuses the environment.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.reelray-installed

.PHONY: test test-slow demo bench reliability clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch would pull the CUDA build.
	$(BIN)/python -m pip install --quiet -c constraints.txt torch
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

demo: $(STAMP)
	$(BIN)/reelray make-tiny-model demo-model
	$(BIN)/reelray inspect demo-model/wan2.1-t2v-tiny-Q8_0.gguf
	$(BIN)/reelray run examples/manifest.parquet --model demo-model --out demo-out --actors 2
	# image to video: the bundled first_frame.png through a tiny Wan2.2 TI2V-5B model set
	$(BIN)/reelray make-tiny-model demo-model-ti2v --family wan2.2-ti2v-5b
	$(BIN)/reelray run examples/i2v_manifest.parquet --model demo-model-ti2v --out demo-out-i2v --actors 2

bench: $(STAMP)
	$(BIN)/python bench/dequant.py
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/text_encoder.py
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/lora.py

reliability: $(STAMP)
	$(BIN)/python bench/reliability.py

clean:
	rm -rf demo-out demo-model demo-out-i2v demo-model-ti2v .pytest_cache .hypothesis
