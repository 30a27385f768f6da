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

import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from rmserve.service.engine.tokenization import Encoded
from rmserve.service.server import auth
from rmserve.service.server.errors import InvalidInput
from rmserve.service.server.rpc import http_error
from rmserve.v1 import reward_pb2 as pb

if TYPE_CHECKING:
    from rmserve.service.server.app import RewardServicer

REWARD_FIELDS = ("reward", "conservative", "min")
_SCORE_METHOD = "/rmserve.v1.RewardService/Score"  # the scope an HTTP scoring call needs, as for gRPC


def _client(request: web.Request) -> str:
    """Who a request counts against for --max-queue-per-client: its API key (a digest, the
    same as over gRPC), else its host (HTTP clients often open a connection per request)."""
    if header := request.headers.get("Authorization"):
        return "key:" + hashlib.sha256(header.encode()).hexdigest()[:16]
    return f"http:{request.remote}"


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or OpenAI-style parts whose text parts are joined."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        other = sorted({str(p.get("type")) for p in content if p.get("type") != "text"})
        if other:
            raise InvalidInput(f"{where}: content parts of type {other} cannot be scored; only text parts can")
        if not all(isinstance(p.get("text"), str) for p in content):
            raise InvalidInput(f'{where}: every text part needs a string "text"')
        return "".join(p["text"] for p in content)
    raise InvalidInput(f'{where}: "content" must be a string or a list of {{"type": "text", "text": ...}} parts')


class HttpFrontDoor:
    def __init__(self, servicer: RewardServicer, *, keys: auth.ApiKeys | None, reward_field: str = "reward"):
        if reward_field not in REWARD_FIELDS:
            raise ValueError(f"--http-reward-field must be one of {REWARD_FIELDS}, got {reward_field!r}")
        self.servicer = servicer
        self.state = servicer.state
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
    def _options(request: web.Request) -> pb.ScoreOptions:
        opts = pb.ScoreOptions(run_id=request.headers.get("X-RMServe-Run-Id", ""))
        if step := request.headers.get("X-RMServe-Step"):
            try:
                opts.step = int(step)
            except ValueError as e:
                raise InvalidInput(f"X-RMServe-Step must be an integer, got {step!r}") from e
        return opts

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

        def encode(encoder) -> list[Encoded]:
            return [encoder.rendered(q, f"query {i}") for i, q in enumerate(queries)]

        results, _ = await self.servicer.score_samples(None, self._options(request), None, encode=encode,
                                                       client=_client(request))
        rewards = [getattr(r, self.reward_field) for r in results]
        logs: dict[str, list] = {
            "rm_reward": [r.reward for r in results], "rm_std": [r.std for r in results],
            "rm_min": [r.min for r in results], "rm_conservative": [r.conservative for r in results],
        }
        if all(r.HasField("epistemic") for r in results):
            logs["rm_epistemic"] = [r.epistemic for r in results]
        if all(r.HasField("ood_score") for r in results):
            logs["rm_ood_score"] = [r.ood_score for r in results]
        if all(r.HasField("ood") for r in results):
            logs["rm_ood"] = [float(r.ood) for r in results]
        return {"rewards": rewards, "scores": rewards, "extra_logs": logs}

    async def score(self, request: web.Request) -> dict[str, Any]:
        body = await self._json(request)
        if not isinstance(body, dict) or "prompt" not in body or "response" not in body:
            raise InvalidInput('the body must be a JSON object with "prompt" (str or messages) and "response" (str)')
        prompt, response = body["prompt"], body["response"]
        if not isinstance(response, str):
            raise InvalidInput('"response" must be a string')
        encode = samples = None
        if isinstance(prompt, str):
            def encode(encoder) -> list[Encoded]:
                # slime with --apply-chat-template sends the prompt rendered: no second template then
                if encoder.is_rendered(prompt):
                    return [encoder.rendered_reply(prompt, response, "the sample")]
                return [encoder.prompt_response(prompt, response, "the sample")]
        elif isinstance(prompt, list) and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in prompt):
            msgs = [pb.Message(role=str(m["role"]), content=_text(m["content"], f"prompt[{i}]"))
                    for i, m in enumerate(prompt)]
            samples = [pb.Sample(conversation=pb.Conversation(messages=[*msgs, pb.Message(role="assistant", content=response)]))]
        else:
            raise InvalidInput('"prompt" must be a string or a list of {"role", "content"} messages')
        (r,), _ = await self.servicer.score_samples(samples, self._options(request), None, encode=encode,
                                                    client=_client(request))
        out = {"reward": r.reward, "conservative": r.conservative, "min": r.min, "std": r.std,
               "epistemic": r.epistemic if r.HasField("epistemic") else None,
               "num_tokens": r.num_tokens, "truncated": r.truncated}
        out["ood_score"] = r.ood_score if r.HasField("ood_score") else None
        out["ood"] = r.ood if r.HasField("ood") else None
        return out

    async def health(self, request: web.Request) -> web.Response:
        ok = self.serving and self.state.slot is not None
        return web.json_response({"status": "SERVING" if ok else "NOT_SERVING"}, status=200 if ok else 503)

    async def model(self, request: web.Request) -> dict[str, Any]:
        m = self.state.live_slot().model
        return {
            "name": m.name, "version": m.version, "kind": m.kind, "num_members": len(m.members),
            "num_heads": m.num_heads, "backbone": m.backbone_name, "backbone_layers": m.backbone_layers,
            "max_tokens": m.max_tokens, "dtype": m.dtype_name, "has_epistemic": m.has_epistemic,
            "ood_threshold": m.ood.threshold if m.ood else None,
            "ood_calibrated_on": m.ood.calibrated_on if m.ood else None,
            "default_uncertainty_penalty": m.uncertainty_penalty, "reward_field": self.reward_field,
            "max_samples_per_request": self.state.config.max_samples_per_request,
        }
