"""Wiring: the grpc.aio server with its services, TLS, auth, reflection, health, the HTTP
front door, the metrics endpoint and the lifecycle (start, load, stop).

The parts live elsewhere: serving state and activation in state.py, the scoring
core in core.py, the doors in reward.py (gRPC RewardService), http.py (HTTP/JSON),
labels.py (LabelService) and admin.py (AdminService). Per scoring call: the door
converts its request (wire.py / http.py) -> core: encode on the tokenizer threads
(encoding.py) -> scheduler (batches across callers) -> engine on its own thread ->
plain results -> the door converts them back. The event loop only moves messages.
Errors become gRPC statuses in service/server/rpc.py alone, through errors.grpc_status
(docs/architecture.md, "The path of one request").
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rmserve.service.data.preferences import SqliteStore
from rmserve.service.engine.backbone import cache_dir
from rmserve.service.server.admin import AdminServicer
from rmserve.service.server.auth import ApiKeyInterceptor, ApiKeys, check_bind_address
from rmserve.service.server.config import ServerConfig
from rmserve.service.server.core import ScoringCore
from rmserve.service.server.http import HttpFrontDoor
from rmserve.service.server.labels import LabelServicer
from rmserve.service.server.ports import listening, stop_listening
from rmserve.service.server.registry import Registry
from rmserve.service.server.replica_sync import RegistryFollower
from rmserve.service.server.reward import RewardServicer
from rmserve.service.server.rpc import add_service, drain
from rmserve.service.server.state import ServingState, resolve_model_path
from rmserve.v1 import admin_pb2 as apb
from rmserve.v1 import label_pb2 as lpb
from rmserve.v1 import reward_pb2 as pb

log = logging.getLogger("rmserve.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RewardService"].full_name
ADMIN_SERVICE_NAME = apb.DESCRIPTOR.services_by_name["AdminService"].full_name


class RewardServer:
    """Lifecycle: start (listening, NOT_SERVING) -> model loaded and warmed (SERVING) -> stop."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.state = ServingState(config)
        self.core = ScoringCore(self.state)  # every door's one way to score
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_http = None
        self._loaded: asyncio.Future | None = None
        self._saver: asyncio.Future | None = None
        self.admin: AdminServicer | None = None
        self.follower: RegistryFollower | None = None  # follows the registry's ACTIVE (--registry-poll)
        self.store: SqliteStore | None = None
        self.http: HttpFrontDoor | None = None
        self.http_port: int | None = None
        self.api_keys: ApiKeys | None = None  # set by start(); the CLI reloads them on SIGHUP

    async def start(self) -> None:
        keys = self.api_keys = ApiKeys.from_sources(self.config.api_keys, self.config.api_keys_env)
        if self.config.tls_client_ca and not (self.config.tls_cert and self.config.tls_key):
            raise ValueError("mutual TLS (--tls-client-ca) needs the server's own --tls-cert and --tls-key")
        # client certificates guard gRPC only: the (plaintext) HTTP front door has API keys or nothing
        mtls_only = bool(self.config.tls_client_ca) and self.config.http_port is None
        check_bind_address(self.config.host, authenticated=keys is not None or mtls_only,
                           insecure_open=self.config.insecure_open)
        registry = Registry(self.config.registry or cache_dir() / "registry")
        self.follower = RegistryFollower(self.state, registry, self.config.registry_poll_s)  # before resolving
        model_path = resolve_model_path(self.config.model, registry)
        interceptors = [ApiKeyInterceptor(keys)] if keys is not None else []
        self._server = grpc.aio.server(interceptors=interceptors, options=self.config.grpc_options())
        add_service(self._server, pb.DESCRIPTOR.services_by_name["RewardService"], RewardServicer(self.state, self.core))
        self.store = SqliteStore(self.config.labels_db or registry.root / "preferences.sqlite3")
        self.admin = AdminServicer(self.state, registry, self.config.data_roots, store_path=self.store.path)
        add_service(self._server, apb.DESCRIPTOR.services_by_name["AdminService"], self.admin)
        add_service(self._server, lpb.DESCRIPTOR.services_by_name["LabelService"], LabelServicer(self.state, self.core, self.store))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, ADMIN_SERVICE_NAME, lpb.DESCRIPTOR.services_by_name["LabelService"].full_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            self._server,
        )
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.config.host}:{self.config.port}"
        if self.config.tls_cert or self.config.tls_key:
            if not (self.config.tls_cert and self.config.tls_key):
                raise ValueError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
            client_ca = Path(self.config.tls_client_ca).read_bytes() if self.config.tls_client_ca else None
            creds = grpc.ssl_server_credentials(
                [(Path(self.config.tls_key).read_bytes(), Path(self.config.tls_cert).read_bytes())],
                root_certificates=client_ca, require_client_auth=client_ca is not None,
            )
            with listening(self.config.host, self.config.port, "--port"):
                self.port = self._server.add_secure_port(address, creds)
        else:
            with listening(self.config.host, self.config.port, "--port"):
                self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.host}:{self.config.port}")
        await self._server.start()
        if self.config.metrics_port is not None:
            with listening(self.config.metrics_host or self.config.host, self.config.metrics_port, "--metrics-port"):
                self._metrics_http, _ = self.state.metrics.serve_http(self.config.metrics_port, self.config.metrics_host or self.config.host)
            self.metrics_port = self._metrics_http.server_port
        self.state.scheduler.start()
        if self.config.http_port is not None:
            self.http = HttpFrontDoor(self.core, keys=keys, reward_field=self.config.http_reward_field)
            with listening(self.config.host, self.config.http_port, "--http-port"):
                self.http_port = await self.http.start(self.config.host, self.config.http_port)
        self._saver = asyncio.ensure_future(self._save_runs_periodically())
        log.info("listening on %s:%d; loading %s (health reports not ready until it is warm)", self.config.host, self.port, model_path)
        self._loaded = asyncio.ensure_future(self._load(model_path))
        self.follower.start()

    async def _save_runs_periodically(self, every_s: float = 5.0) -> None:
        """The run monitor's summaries reach disk within `every_s` (and at stop)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every_s)
            try:
                await loop.run_in_executor(None, self.state.monitor.save)
            except OSError as e:  # a full disk must not stop scoring; the next try may succeed
                log.warning("run monitor: cannot save %s: %s", self.state.monitor.path, e)

    async def _load(self, path: Path) -> None:
        model = (await self.state.activate(path)).model
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        if self.http is not None:
            self.http.serving = True
        log.info(
            "SERVING %s version %s (%d heads, %s, max %d tokens) on %s:%d, metrics on %s, %s",
            model.name, model.version, model.num_heads, model.dtype_name, model.max_tokens,
            self.config.host, self.port, self.metrics_port or "off",
            "HTTP off" if self.http_port is None else f"HTTP on {self.http_port}",
        )

    async def wait_ready(self) -> None:
        """Returns once SERVING; raises the load error if the model failed to load."""
        assert self._loaded is not None, "call start() first"
        await self._loaded

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop (SIGTERM): health NOT_SERVING first, then new calls get UNAVAILABLE
        while the calls in flight finish within `grace` (default: config.grace_s); returns
        as soon as none is left, whatever streams are still open (service/server/rpc.py `drain`)."""
        await self.health.enter_graceful_shutdown()
        self.state.work.close()
        if self.follower is not None:  # no hot swap while stopping
            await self.follower.stop()
        if self.http is not None:
            self.http.serving = False
        self.state.metrics.ready.set(0)
        if self._server is not None:
            await drain(self._server, self.state.work, self.config.grace_s if grace is None else grace)
        if self.http is not None:  # its requests in flight use the scheduler: stop it first
            await self.http.stop()
        await self.state.scheduler.stop()
        if self._saver is not None:
            self._saver.cancel()
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.state.monitor.save)
        except OSError as e:
            log.warning("run monitor: cannot save %s: %s", self.state.monitor.path, e)
        if self.admin is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.admin.jobs.stop)
        if self._loaded is not None and not self._loaded.done():
            self._loaded.cancel()
        if self._metrics_http is not None:
            stop_listening(self._metrics_http)  # no wait for its 0.5 s poll (ports.py)
        if self.store is not None:
            self.store.close()
        self.state.tokenizer_pool.shutdown(wait=False)

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()
