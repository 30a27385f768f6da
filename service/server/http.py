"""The HTTP/JSON front door: OpenRLHF's and slime's reward protocols beside gRPC.

Same process and event loop as the gRPC server (aiohttp on asyncio), and the
same path for every sample: validation and tokenisation on the tokenizer
threads, the shared scheduler (so many single-sample requests coalesce into
batched forwards), the API-key check of the `score` scope, the metrics, and the
error mapping of `service/server/rpc.py` (HTTP status + `{"error": {"code", "message"}}`).

Routes (docs/http.md):
- `POST /get_reward` — OpenRLHF (`--reward.remote_url`): `{"query": [str], "prompts": [...],
  "labels": [...]}`; each query is prompt + response with the policy's chat template
  already applied, tokenised as it is. Answers `{"rewards", "scores", "extra_logs"}`.
- `POST /score` — slime (`--rm-type remote_rm --rm-url`): `{"prompt": str | messages,
  "response": str, "label": ...}` → flat `{"reward", "conservative", "min", "std", ...}`.
- `GET /health` — 200 only when SERVING; `GET /v1/model` — the model info as JSON.

Calls may be tagged for the run monitor with headers `X-RMServe-Run-Id` and `X-RMServe-Step`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from rmserve.service.server import auth
from rmserve.service.server.core import ModelInfo, ScoreOptions, ScoreResult, ScoringCore
from rmserve.service.server.encoding import Chat, Rendered, Sample, Text, messages
from rmserve.service.server.errors import InvalidInput
from rmserve.service.server.rpc import http_error

REWARD_FIELDS = ("reward", "conservative", "min")
_SCORE_METHOD = "/rmserve.v1.RewardService/Score"  # the scope an HTTP scoring call needs, as for gRPC


def _caller(request: web.Request) -> str:
    """Who a request counts against for --max-queue-per-client: its API key (the same digest
    as over gRPC), else its host (HTTP clients often open a connection per request)."""
    return auth.caller_id(request.headers.get("Authorization"), f"http:{request.remote}")


# -- JSON <-> the core's objects: the one place this door reads or writes result fields ---------

def extra_logs(results: list[ScoreResult]) -> dict[str, list]:
    """OpenRLHF's `extra_logs`: every field, per sample; optional ones when every sample has them."""
    logs: dict[str, list] = {
        "rm_reward": [r.reward for r in results], "rm_std": [r.std for r in results],
        "rm_min": [r.min for r in results], "rm_conservative": [r.conservative for r in results],
    }
    for name, values in (("rm_epistemic", [r.epistemic for r in results]),
                         ("rm_ood_score", [r.ood_score for r in results]),
                         ("rm_ood", [None if r.ood is None else float(r.ood) for r in results])):
        if all(v is not None for v in values):
            logs[name] = values
    return logs


def result_json(r: ScoreResult) -> dict[str, Any]:
    """slime's flat result: every field a result has (None where the model has none)."""
    return {"reward": r.reward, "conservative": r.conservative, "min": r.min, "std": r.std,
            "epistemic": r.epistemic, "num_tokens": r.num_tokens, "truncated": r.truncated,
            "ood_score": r.ood_score, "ood": r.ood}


def model_json(m: ModelInfo, reward_field: str) -> dict[str, Any]:
    return {
        "name": m.name, "version": m.version, "kind": m.kind, "num_members": m.num_members,
        "num_heads": m.num_heads, "backbone": m.backbone, "backbone_layers": m.backbone_layers,
        "max_tokens": m.max_tokens, "dtype": m.dtype, "has_epistemic": m.has_epistemic,
        "ood_threshold": m.ood_threshold, "ood_calibrated_on": m.ood_calibrated_on,
        "default_uncertainty_penalty": m.default_uncertainty_penalty, "reward_field": reward_field,
        "max_samples_per_request": m.max_samples_per_request,
    }


class HttpFrontDoor:
    def __init__(self, core: ScoringCore, *, keys: auth.ApiKeys | None, reward_field: str = "reward"):
        if reward_field not in REWARD_FIELDS:
            raise ValueError(f"--http-reward-field must be one of {REWARD_FIELDS}, got {reward_field!r}")
        self.core = core
        self.state = core.state
        self.keys = keys
        self.reward_field = reward_field
        self.serving = False  # set by the server: True while SERVING
        self.app = web.Application(client_max_size=self.state.config.max_message_bytes)
        self.app.add_routes([
            web.post("/get_reward", self._route("HTTP /get_reward", self.get_reward)),
            web.post("/score", self._route("HTTP /score", self.score)),
            web.get("/health", self.health),
            web.get("/v1/model", self._route("HTTP /v1/model", self.model)),
        ])
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> int:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the bound port (port 0 picks one)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- plumbing ---------------------------------------------------------------------------

    def _route(self, method: str, fn: Callable[[web.Request], Awaitable[Any]]):
        """Auth, counting, timing and the error mapping around a JSON handler."""

        async def handler(request: web.Request) -> web.Response:
            metrics = self.state.metrics
            t0 = time.perf_counter()
            code = "OK"
            metrics.in_flight.inc()
            try:
                if self.keys is not None:
                    auth.check(self.keys, _SCORE_METHOD, [("authorization", request.headers.get("Authorization", ""))])
                return web.json_response(await fn(request), dumps=lambda o: json.dumps(o, allow_nan=False))
            except Exception as e:
                status, body, headers = http_error(e)
                code = body["error"]["code"]
                return web.json_response(body, status=status, headers=headers)
            finally:
                metrics.in_flight.dec()
                metrics.requests.labels(method, code).inc()
                if code == "OK":
                    metrics.latency.labels(method).observe(time.perf_counter() - t0)

        return handler

    @staticmethod
    async def _json(request: web.Request) -> Any:
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidInput(f"the body is not valid JSON: {e}") from e

    @staticmethod
    def _options(request: web.Request) -> ScoreOptions:
        step = request.headers.get("X-RMServe-Step")
        try:
            return ScoreOptions(run_id=request.headers.get("X-RMServe-Run-Id", ""), step=int(step) if step else None)
        except ValueError as e:
            raise InvalidInput(f"X-RMServe-Step must be an integer, got {step!r}") from e

    # -- routes ---------------------------------------------------------------------------

    async def get_reward(self, request: web.Request) -> dict[str, Any]:
        body = await self._json(request)
        if not isinstance(body, dict) or "query" not in body:
            raise InvalidInput('the body must be a JSON object with "query": [str, ...] (OpenRLHF\'s remote reward request)')
        queries = body["query"]
        if isinstance(queries, str):
            queries = [queries]
        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
            raise InvalidInput('"query" must be a list of strings (prompt + response, chat template applied)')
        if not queries:  # OpenRLHF sends empty slices when several reward URLs split a batch
            return {"rewards": [], "scores": [], "extra_logs": {}}

        scored = await self.core.score([Sample(Rendered(q)) for q in queries], self._options(request),
                                       caller=_caller(request), name=lambda i: f"query {i}",
                                       max_samples=len(queries))  # OpenRLHF sends a whole batch: no split
        rewards = [getattr(r, self.reward_field) for r in scored.results]
        return {"rewards": rewards, "scores": rewards, "extra_logs": extra_logs(scored.results)}

    async def score(self, request: web.Request) -> dict[str, Any]:
        body = await self._json(request)
        if not isinstance(body, dict) or "prompt" not in body or "response" not in body:
            raise InvalidInput('the body must be a JSON object with "prompt" (str or messages) and "response" (str)')
        prompt, response = body["prompt"], body["response"]
        if not isinstance(response, str):
            raise InvalidInput('"response" must be a string')
        if isinstance(prompt, str):
            # slime with --apply-chat-template sends the prompt rendered: no second template then
            sample = Sample(Text(prompt, response, maybe_rendered=True))
        elif isinstance(prompt, list) and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in prompt):
            sample = Sample(Chat([*messages(prompt, lambda i: f"prompt[{i}]"), {"role": "assistant", "content": response}]))
        else:
            raise InvalidInput('"prompt" must be a string or a list of {"role", "content"} messages')
        scored = await self.core.score([sample], self._options(request), caller=_caller(request),
                                       name=lambda i: "the sample")
        return result_json(scored.results[0])

    async def health(self, request: web.Request) -> web.Response:
        ok = self.serving and self.state.slot is not None
        return web.json_response({"status": "SERVING" if ok else "NOT_SERVING"}, status=200 if ok else 503)

    async def model(self, request: web.Request) -> dict[str, Any]:
        return model_json(self.core.model_info(), self.reward_field)
