"""API keys with scopes: scoring, labelling and admin are separate permissions.

`--api-keys FILE` is a JSON object mapping each key to its scopes:

    {"k-trainer-7f3a": ["score"], "k-ops-91bc": ["score", "admin"]}

Callers send `authorization: Bearer <key>` (the SDK's `api_key=`). Without
the file the server is open (fine on 127.0.0.1; do not expose it so). Health
and reflection stay open so that probes and tooling work without keys.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from rmserve.service.errors import PermissionDenied, Unauthenticated
from rmserve.service.rpc import refusing_handler

SCOPES = frozenset({"score", "label", "admin"})

# gRPC service -> the scope its methods need; services not listed are open.
_SERVICE_SCOPE = {
    "rmserve.v1.RewardService": "score",
    "rmserve.v1.AdminService": "admin",
    "rmserve.v1.LabelService": "label",
}


def load_api_keys(path: str | Path) -> dict[str, frozenset[str]]:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read API keys from {path}: {e}") from e
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path} must be a non-empty JSON object mapping keys to lists of scopes")
    keys: dict[str, frozenset[str]] = {}
    for key, scopes in raw.items():
        if not isinstance(scopes, list) or not set(scopes) <= SCOPES:
            raise ValueError(f"{path}: scopes of a key must be a list drawn from {sorted(SCOPES)}")
        keys[key] = frozenset(scopes)
    return keys


def required_scope(method: str) -> str | None:
    """'/rmserve.v1.RewardService/Score' -> 'score'; None for open services."""
    service = method.lstrip("/").split("/", 1)[0]
    return _SERVICE_SCOPE.get(service)


def check(keys: dict[str, frozenset[str]], method: str, metadata) -> None:
    scope = required_scope(method)
    if scope is None:
        return
    header = next((v for k, v in metadata or () if k == "authorization"), None)
    if not header or not header.startswith("Bearer "):
        raise Unauthenticated(f"{method} needs an API key: send 'authorization: Bearer <key>' (SDK: api_key=...)")
    token = header.removeprefix("Bearer ").strip()
    # compare against every key in constant time, so timing does not leak a prefix
    scopes = next((s for k, s in keys.items() if hmac.compare_digest(k.encode(), token.encode())), None)
    if scopes is None:
        raise Unauthenticated("unknown API key")
    if scope not in scopes:
        raise PermissionDenied(f"this API key lacks the '{scope}' scope that {method} needs")


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: dict[str, frozenset[str]]):
        self.keys = keys

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
