"""Server configuration: one dataclass, filled from CLI flags (see cli.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).parent.parent / "default_model"  # service/default_model

# Keepalive (docs/production.md#keepalive), one place for the server's values.
# The server pings every connection, idle or not, each KEEPALIVE_TIME_MS and drops it when no
# ack comes within KEEPALIVE_TIMEOUT_MS: a client that vanished without closing its socket
# (half-open: a killed node, a dropped NAT entry) frees its calls within about 80 s.
KEEPALIVE_TIME_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000
# Clients may ping this often even with no call open (that is what keeps a trainer's idle
# channel, and the NAT or load-balancer entry on its path, alive); pinging more often draws a
# GOAWAY (too_many_pings) after MAX_PING_STRIKES. The SDK pings every 60 s (client/_core.py,
# KEEPALIVE_TIME_MS there); tests/test_keepalive.py keeps it at or above this.
MIN_CLIENT_PING_INTERVAL_MS = 30_000
MAX_PING_STRIKES = 2

# What `--backend` accepts (service/engine/backends.py implements each; a test keeps them equal).
BACKEND_NAMES = ("torch", "onnx", "accelerate", "vllm")


@dataclass
class ServerConfig:
    model: str | None = None            # None: the embedded default
    host: str = "127.0.0.1"
    port: int = 50051                   # 0 picks a free port
    metrics_port: int | None = 9400     # None: no metrics endpoint
    metrics_host: str | None = None     # None: same address as gRPC
    dtype: str = "auto"
    device: str = "cpu"                 # cpu | cuda[:n] | auto (CUDA when there is one)
    backend: str = "torch"              # what runs the forward: service/engine/backends.py
    backend_options: dict = field(default_factory=dict)  # the backend's own load settings (keyword arguments):
                                        # accelerate: device_map, max_memory, offload_folder;
                                        # vllm: tensor_parallel_size, gpu_memory_utilization (docs/big-models.md)
    max_tokens: int | None = None       # per-sample limit; default from the manifest
    token_budget: int = 4096            # padded tokens per engine forward
    batch_tokens: int = 16384           # real tokens per scheduler batch
    max_wait_ms: float = 5.0            # how long a batch waits to fill
    max_queue: int = 8192               # samples waiting before RESOURCE_EXHAUSTED
    max_queue_per_client: int | None = None  # samples one client (API key, else connection) may have
                                        # queued or being scored; None: max_queue // 2; 0: no cap
    max_samples_per_request: int = 1024
    max_message_bytes: int = 64 * 1024 * 1024
    tokenizer_threads: int = 2
    grace_s: float = 10.0               # graceful-stop window for in-flight RPCs
    keepalive_time_ms: int = KEEPALIVE_TIME_MS
    keepalive_timeout_ms: int = KEEPALIVE_TIMEOUT_MS
    min_client_ping_interval_ms: int = MIN_CLIENT_PING_INTERVAL_MS
    warmup: bool = True
    registry: str | None = None         # trained versions; None: $RMSERVE_CACHE/registry
    registry_poll_s: float = 5.0        # follow the registry's ACTIVE pointer every N s (replica_sync.py); 0: off
    data_roots: list[str] = field(default_factory=list)  # where Train may read data; empty: no training
    api_keys: str | None = None         # JSON {key: [scopes]}; None: no authentication
    api_keys_env: str | None = None     # or: the name of an environment variable holding that JSON
    tls_cert: str | None = None         # PEM certificate chain; with tls_key, serve TLS only
    tls_key: str | None = None
    tls_client_ca: str | None = None    # PEM CA bundle: mutual TLS, every client must present a cert it signed
    insecure_open: bool = False         # allow an open server (no keys, no mTLS) on a non-loopback address
    http_port: int | None = None        # HTTP/JSON front door (OpenRLHF, slime); None: off; 0 picks a free port
    http_reward_field: str = "reward"   # what /get_reward returns as `rewards`: reward | conservative | min
    labels_db: str | None = None        # preference store (SQLite); None: <registry>/preferences.sqlite3
    runs_file: str | None = None        # run-monitor summaries; None: <registry>/runs.json; "": not persisted
    monitor: dict = field(default_factory=dict)  # MonitorConfig fields (thresholds, caps); empty: defaults

    def queue_per_client(self) -> int | None:
        """The per-client cap the scheduler enforces (None: none): by default half the queue,
        so one greedy client leaves the other half to everyone else."""
        if self.max_queue_per_client is None:
            return max(1, self.max_queue // 2)
        return self.max_queue_per_client or None

    def grpc_options(self) -> list[tuple[str, int]]:
        """The gRPC server's channel arguments: message limits, keepalive, an unshared port."""
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
            # ping idle connections too (half-open ones are found), and let clients ping theirs
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),  # no cap on pings between data frames
            ("grpc.http2.min_ping_interval_without_data_ms", self.min_client_ping_interval_ms),
            ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
            ("grpc.so_reuseport", 0),  # a busy --port is refused (ports.py), not silently shared
        ]
