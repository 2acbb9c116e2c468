# The two commands of the README. Both set themselves up: a missing .venv is
# created and the project installed with the pinned versions of
# constraints.txt; a second call reuses the environment.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.reelray-installed

.PHONY: test test-slow demo bench reliability toy-model clean

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
	# the embedded trained toy-world model: videos that show their prompts, and how well, read off the pixels
	$(BIN)/reelray make-tiny-model demo-model
	$(BIN)/reelray inspect demo-model/wan2.1-t2v-toy-Q8_0.gguf
	$(BIN)/reelray run examples/manifest.parquet --model demo-model --out demo-out --actors 2
	$(BIN)/python -m engine.toy.adherence demo-out --verbose
	# image to video: the bundled first_frame.png through a tiny Wan2.2 TI2V-5B model set
	$(BIN)/reelray make-tiny-model demo-model-ti2v --family wan2.2-ti2v-5b
	$(BIN)/reelray run examples/i2v_manifest.parquet --model demo-model-ti2v --out demo-out-i2v --actors 2

bench: $(STAMP)
	$(BIN)/python bench/dequant.py
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/text_encoder.py
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/lora.py
	$(BIN)/python bench/adherence.py
	$(BIN)/python bench/quality.py
	$(BIN)/python bench/toy_training.py

# Retrain the embedded toy-world model (engine/toy/model): seeded, CPU-only, one run of about 55 minutes on
# 2 cores (VAE ~13 min, DiT ~43-45 min; the thread counts are the ones the committed files were trained with).
# Nobody needs to: the trained files are committed and pinned by tests/test_toy_embedded.py. Every step is
# seeded: run again on this machine it rewrote the committed files bit for bit (58.5 min). bfloat16 rounding
# depends on the CPU's kernels, so expect the same files only from the same torch build on the same kind of
# CPU (this one has AMX bfloat16 units).
# docs/quality.md (session 13) has what each choice bought; the earlier four-stage float32 recipe (~4.8 h)
# is in the git history of this file.
toy-model: $(STAMP)
	mkdir -p build/toy
	# 1. the VAE: 800 steps (480 on single frames, then 320 on clips with the learning rate warmed up again),
	# the shape's pixels counted 5x, then 400 steps of the decoder alone (~8 + ~4.5 min)
	$(BIN)/python -u -m engine.toy.train_vae --threads 2 --steps 800 --summed-norms --shape-weight 5 --video-warmup 50 \
		--out build/toy/vae-whole.safetensors
	$(BIN)/python -u -m engine.toy.train_vae --threads 2 --steps 400 --summed-norms --shape-weight 5 \
		--finetune-decoder build/toy/vae-whole.safetensors --out build/toy/wan_2.1_vae_toy.safetensors
	# 2. the DiT: latents of 8 clips per training scene (~6 min), then 2800 bfloat16 steps at batch 64 on the
	# canonical phrasing (~36 min), a frozen umT5 whose words stay their own (--text-mixing 0.1), each latent
	# cell's loss weighted by the shape's share of it (--shape-weight 4); writes engine/toy/model
	$(BIN)/python -u -m engine.toy.train_dit --threads 2 --layers 4 --steps 2800 --batch 64 --lr 1e-3 \
		--precision bfloat16 --text-mixing 0.1 --canonical-only --clips-per-scene 8 --shape-weight 4 --eval 12 \
		--vae build/toy/wan_2.1_vae_toy.safetensors --pool build/toy/pool8.pt --out engine/toy/model

reliability: $(STAMP)
	$(BIN)/python bench/reliability.py

clean:
	rm -rf demo-out demo-model demo-out-i2v demo-model-ti2v .pytest_cache .hypothesis
