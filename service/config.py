"""Server configuration: one dataclass, filled from CLI flags (see cli.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"


@dataclass
class ServerConfig:
    model: str | None = None            # None: the embedded default
    host: str = "127.0.0.1"
    port: int = 50051                   # 0 picks a free port
    metrics_port: int | None = 9400     # None: no metrics endpoint
    metrics_host: str | None = None     # None: same address as gRPC
    dtype: str = "auto"
    device: str = "cpu"                 # cpu | cuda[:n] | auto (CUDA when there is one)
    max_tokens: int | None = None       # per-sample limit; default from the manifest
    token_budget: int = 4096            # padded tokens per engine forward
    batch_tokens: int = 16384           # real tokens per scheduler batch
    max_wait_ms: float = 5.0            # how long a batch waits to fill
    max_queue: int = 8192               # samples waiting before RESOURCE_EXHAUSTED
    max_samples_per_request: int = 1024
    max_message_bytes: int = 64 * 1024 * 1024
    tokenizer_threads: int = 2
    grace_s: float = 10.0               # graceful-stop window for in-flight RPCs
    warmup: bool = True
    registry: str | None = None         # trained versions; None: $RMSERVE_CACHE/registry
    data_roots: list[str] = field(default_factory=list)  # where Train may read data; empty: no training
    api_keys: str | None = None         # JSON {key: [scopes]}; None: no authentication
    tls_cert: str | None = None         # PEM certificate chain; with tls_key, serve TLS only
    tls_key: str | None = None
    http_port: int | None = None        # HTTP/JSON front door (OpenRLHF, slime); None: off; 0 picks a free port
    http_reward_field: str = "reward"   # what /get_reward returns as `rewards`: reward | conservative | min
    labels_db: str | None = None        # preference store (SQLite); None: <registry>/preferences.sqlite3
    runs_file: str | None = None        # run-monitor summaries; None: <registry>/runs.json; "": not persisted
    monitor: dict = field(default_factory=dict)  # MonitorConfig fields (thresholds, caps); empty: defaults
