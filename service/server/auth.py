"""API keys with scopes: scoring, labelling and admin are separate permissions.

`--api-keys FILE` (or `--api-keys-env VAR`, the same JSON in an environment
variable, for secret stores that inject variables) maps each key to its scopes:

    {"k-trainer-7f3a": ["score"], "k-ops-91bc": ["score", "admin"]}

Callers send `authorization: Bearer <key>` (the SDK's `api_key=`). Keys are
compared in constant time against every known key and are never logged. SIGHUP
re-reads the file: keys rotate without a restart, and a bad file keeps the old
keys. Without keys (and without mTLS) the server is open, so it binds only
loopback unless `--insecure-open` says otherwise (`check_bind_address`).
Health and reflection stay open so that probes and tooling work without keys.
docs/security.md has the threat model.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import grpc

from rmserve.service.server.errors import PermissionDenied, Unauthenticated
from rmserve.service.server.rpc import refusing_handler

log = logging.getLogger("rmserve.auth")

SCOPES = frozenset({"score", "label", "admin"})

# gRPC service -> the scope its methods need; services not listed are open.
_SERVICE_SCOPE = {
    "rmserve.v1.RewardService": "score",
    "rmserve.v1.AdminService": "admin",
    "rmserve.v1.LabelService": "label",
}


def parse_api_keys(text: str, source: str) -> dict[str, frozenset[str]]:
    """JSON text -> {key: scopes}. Error messages name `source`, never a key."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"cannot read API keys from {source}: {e}") from e
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{source} must be a non-empty JSON object mapping keys to lists of scopes")
    keys: dict[str, frozenset[str]] = {}
    for key, scopes in raw.items():
        if not key:
            raise ValueError(f"{source}: an API key may not be empty")
        if not isinstance(scopes, list) or not set(scopes) <= SCOPES:
            raise ValueError(f"{source}: scopes of a key must be a list drawn from {sorted(SCOPES)}")
        keys[key] = frozenset(scopes)
    return keys


def load_api_keys(path: str | Path) -> dict[str, frozenset[str]]:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read API keys from {path}: {e}") from e
    return parse_api_keys(text, str(path))


def load_api_keys_env(var: str) -> dict[str, frozenset[str]]:
    text = os.environ.get(var)
    if text is None:
        raise ValueError(f"--api-keys-env: the environment variable {var} is not set")
    return parse_api_keys(text, f"${var}")


def caller_id(authorization: str | None, otherwise: str) -> str:
    """Who a call counts against for --max-queue-per-client, the same on every door: its
    `authorization` header as a short digest (a key is never kept), else `otherwise` (its
    connection or host)."""
    if authorization:
        return "key:" + hashlib.sha256(authorization.encode()).hexdigest()[:16]
    return otherwise


def _digest(key: str) -> bytes:
    # Fixed-length digests, so compare_digest's time depends on neither the content nor the length of a key.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ApiKeys:
    """The live key set. Reload swaps the whole set at once, so a check sees the old
    keys or the new ones, never a mix; only SHA-256 digests are kept in memory."""

    def __init__(self, keys: Mapping[str, frozenset[str]], *, path: str | Path | None = None, env: str | None = None):
        self.path = None if path is None else Path(path)
        self.env = env
        self._set(keys)

    @classmethod
    def from_sources(cls, path: str | Path | None = None, env: str | None = None) -> ApiKeys | None:
        """The keys of `--api-keys FILE` or `--api-keys-env VAR` (not both); None: no keys, an open server."""
        if path and env:
            raise ValueError("give --api-keys FILE or --api-keys-env VAR, not both")
        if path:
            return cls(load_api_keys(path), path=path)
        if env:
            return cls(load_api_keys_env(env), env=env)
        return None

    def _set(self, keys: Mapping[str, frozenset[str]]) -> None:
        self._entries = tuple((_digest(k), frozenset(s)) for k, s in keys.items())

    def __len__(self) -> int:
        return len(self._entries)

    def scopes_of(self, token: str) -> frozenset[str] | None:
        """The token's scopes, or None. Every key is compared (no early exit), each in constant time."""
        digest = _digest(token)
        found = None
        for key_digest, scopes in self._entries:
            if hmac.compare_digest(key_digest, digest):
                found = scopes
        return found

    def reload(self) -> bool:
        """Re-read the key file (SIGHUP). On any error the keys in use stay and the error is
        logged with the file's name; returns whether the new keys are in use."""
        if self.path is None:
            log.warning("API keys came from $%s, which cannot change in a running process: restart to change them", self.env)
            return False
        try:
            keys = load_api_keys(self.path)
        except ValueError as e:
            log.error("API keys not reloaded, keeping the %d in use: %s", len(self), e)
            return False
        self._set(keys)
        log.info("reloaded %d API keys from %s", len(self), self.path)
        return True


def install_reload_on_sighup(loop: asyncio.AbstractEventLoop, keys: ApiKeys) -> bool:
    """SIGHUP -> keys.reload() on the event loop; False where the platform has no SIGHUP."""
    sighup = getattr(signal, "SIGHUP", None)
    if sighup is None:
        return False
    loop.add_signal_handler(sighup, keys.reload)
    return True


def _is_loopback(host: str) -> bool:
    """Every address `host` names is loopback (a name that does not resolve counts as not)."""
    host = host.strip().removeprefix("[").removesuffix("]")
    if not host:
        return False  # "" binds every interface
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%", 1)[0]).is_loopback for info in infos)


def check_bind_address(host: str, *, authenticated: bool, insecure_open: bool = False) -> None:
    """An open server (no API keys, no client certificates) answers anyone who can reach it,
    admin RPCs included: it binds loopback only, unless the operator says `--insecure-open`."""
    if authenticated or insecure_open or _is_loopback(host):
        return
    raise ValueError(
        f"refusing to serve without authentication on {host!r}, which is not a loopback address: anyone who can "
        "reach it could score, label and train. Give --api-keys FILE / --api-keys-env VAR or --tls-client-ca PEM, "
        "or pass --insecure-open if the network itself is trusted (docs/security.md)"
    )


def required_scope(method: str) -> str | None:
    """'/rmserve.v1.RewardService/Score' -> 'score'; None for open services."""
    service = method.lstrip("/").split("/", 1)[0]
    return _SERVICE_SCOPE.get(service)


def check(keys: ApiKeys | Mapping[str, frozenset[str]], method: str, metadata) -> None:
    scope = required_scope(method)
    if scope is None:
        return
    if not isinstance(keys, ApiKeys):
        keys = ApiKeys(keys)
    header = next((v for k, v in metadata or () if k == "authorization"), None)
    if not header or not header.startswith("Bearer "):
        raise Unauthenticated(f"{method} needs an API key: send 'authorization: Bearer <key>' (SDK: api_key=...)")
    scopes = keys.scopes_of(header.removeprefix("Bearer ").strip())
    if scopes is None:
        raise Unauthenticated("unknown API key")
    if scope not in scopes:
        raise PermissionDenied(f"this API key lacks the '{scope}' scope that {method} needs")


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys | Mapping[str, frozenset[str]]):
        self.keys = keys if isinstance(keys, ApiKeys) else ApiKeys(keys)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        try:
            check(self.keys, details.method, details.invocation_metadata)
        except (Unauthenticated, PermissionDenied) as e:
            handler = await continuation(details)
            if handler is None:
                return None
            return refusing_handler(e, handler)
        return await continuation(details)
