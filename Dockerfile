# syntax=docker/dockerfile:1.7
#
# stereo-recon: PSMNet disparity service on libtorch 2.11.0 (CUDA 13 or CPU).
#
#   docker build -t stereo-recon .                       # or: podman build --format docker
#   docker run --gpus all -p 5000:5000 stereo-recon      # GPU (NVIDIA container toolkit)
#   docker run -p 5000:5000 stereo-recon                 # same image, CPU
#   docker run --rm -v "$PWD:/data" stereo-recon batch /data/in --out /data/out
#
# The builder compiles the release binary and exports the TorchScript model with
# the same Makefile targets the README uses, then `.ci/bundle.sh` assembles the
# runtime layout in /opt/stereo-recon. CI runs that same script and starts the
# server from its output with an empty environment (tests/bundle.rs), so the
# runtime stage below is only a copy of something tested.

# Both stages are Debian 12: the binary and libtorch link against its glibc and
# libstdc++, and its python3 (3.11) is the Python the README's set-up uses.
ARG RUST_IMAGE=rust:1.95.0-slim-bookworm
ARG RUNTIME_IMAGE=debian:12.12-slim

FROM ${RUST_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Versions come from the pinned base image's Debian release; pinning each package
# too would break the build whenever Debian ships a security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        binutils ca-certificates g++ make python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# The Makefile keeps the venv (torch==2.11.0 from PyPI), the checkpoint and its
# downloads in CACHE; tch finds libtorch through that venv's torch.
ENV CACHE=/opt/cache \
    LIBTORCH_USE_PYTORCH=1 \
    VIRTUAL_ENV=/opt/cache/venv \
    PATH=/opt/cache/venv/bin:$PATH

# Layer 1, Python only: venv, checkpoint (sha256-checked) and TorchScript export.
# It depends on models/ alone, so changing Rust code never redoes it.
COPY Makefile ./
COPY models/ models/
RUN --mount=type=cache,target=/root/.cache/pip \
    make model tools

# Layer 2, Rust: the registry and target/ live in BuildKit cache mounts, so a
# source change recompiles this crate only, not its dependencies. target/ is a
# mount, so the bundle is assembled in the same step.
COPY Cargo.toml Cargo.lock build.rs ./
COPY src/ src/
COPY templates/ templates/
COPY tests/ tests/
COPY static/ static/
COPY data/ data/
COPY .ci/bundle.sh .ci/bundle.sh
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release \
    && .ci/bundle.sh --binary target/release/stereo-recon --out /opt/stereo-recon

FROM ${RUNTIME_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# One package: the ffmpeg program, through which `stereo-recon batch` reads and writes
# stereo videos (a pipe of raw frames). A numeric user (Kubernetes' runAsNonRoot can
# verify it). The health check is the binary's own `healthcheck` subcommand, not curl.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 stereo \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin stereo

# bin/, lib/ (libtorch + CUDA/cuDNN user-space libraries), models/, static/, data/,
# all owned by root and read-only to the server's user. One COPY per part, largest
# and steadiest first: bundle.sh gives lib/ the timestamps of the wheel's files, so
# a source change leaves the 3.5 GB lib/ layer byte-identical (nothing to push or
# pull again) and only the binary's layer changes. Plain COPY (no --link): buildah
# 1.28 (Debian 12's podman 4.3) accepts only --chmod, --chown and --from, and the
# byte-identical layer does not need it.
COPY --from=builder /opt/stereo-recon/lib /opt/stereo-recon/lib
COPY --from=builder /opt/stereo-recon/models /opt/stereo-recon/models
COPY --from=builder /opt/stereo-recon/static /opt/stereo-recon/static
COPY --from=builder /opt/stereo-recon/data /opt/stereo-recon/data
COPY --from=builder /opt/stereo-recon/MANIFEST /opt/stereo-recon/MANIFEST
COPY --from=builder /opt/stereo-recon/bin /opt/stereo-recon/bin

WORKDIR /opt/stereo-recon
# The binary's RUNPATH is already $ORIGIN/../lib; LD_LIBRARY_PATH also covers the
# libraries cuDNN and NVRTC open with dlopen. libcuda.so.1 (the driver) is mounted
# from the host by the NVIDIA container toolkit when the container runs with --gpus;
# without it CUDA is unavailable and --device auto serves on CPU.
# The server writes nothing; the only writes are CUDA's and PyTorch's kernel caches,
# pointed at /tmp so the root filesystem can be read-only (--read-only --tmpfs /tmp,
# or Kubernetes' readOnlyRootFilesystem with an emptyDir on /tmp).
ENV LD_LIBRARY_PATH=/opt/stereo-recon/lib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    CUDA_CACHE_PATH=/tmp/.nv/ComputeCache \
    STEREO_RECON_HOST=0.0.0.0 \
    STEREO_RECON_PORT=5000 \
    STEREO_RECON_DEVICE=auto

USER 10001:10001
EXPOSE 5000
# 200 only once the model is loaded and warm; CPU warm-up and first CUDA use take a
# while. The check follows the port the server really listens on (`serve --port N`
# in the arguments included): it reads PID 1's listening socket from /proc.
# Podman and buildah keep HEALTHCHECK only in Docker-format images: --format docker.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/opt/stereo-recon/bin/stereo-recon", "healthcheck"]
# Exec form: the server is PID 1 and receives SIGTERM itself (graceful drain).
ENTRYPOINT ["/opt/stereo-recon/bin/stereo-recon"]
CMD ["serve"]
