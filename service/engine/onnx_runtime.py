"""The onnx backend: a directory written by `rmserve export-onnx`, run by onnxruntime.

```
exported/
  onnx.json                    # FORMAT below: the ensemble's facts, the graph's outputs, the check
  model.onnx (+ .data)         # input_ids, attention_mask [B, T] -> each member's last-token embedding [B, H]
  tokenizer/                   # the backbone's tokenizer and chat template
  member0/heads.safetensors    # heads with normalisation folded in; uncertainty, ood as in an ensemble
```

The graph stops at the embeddings the heads read: heads, statistics, the epistemic
term and the OOD score run through the same `last_token_scores` launch and
`engine_output` as the torch backend, so the two differ only in the forward.
Batches are right-padded and length-sorted under the token budget (the graph reads
each sequence's last real token from its attention mask); there is no KV cache in
the graph, so GRPO prefixes are not shared on this backend.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from rmserve.service.engine.backbone import Backbone
from rmserve.service.engine.ensemble import EnsembleFormatError, EnsembleManifest, load_member
from rmserve.service.engine.model import Member, RewardModel, resolve_device
from rmserve.service.engine.ood import OodCalibration
from rmserve.service.engine.padding import pad_token_id, right_pad
from rmserve.service.engine.scoring import (
    BatchStats,
    EngineOutput,
    engine_output,
    member_scores,
    plan_batches,
)
from rmserve.service.engine.tokenization import PromptEncoder

log = logging.getLogger(__name__)

FORMAT = "rmserve-onnx/1"
RECORD = "onnx.json"
GRAPH = "model.onnx"
TOKENIZER = "tokenizer"


@dataclass
class OnnxGraph:
    """An onnxruntime session and what it is: stands where a torch backbone stands."""

    session: object            # onnxruntime.InferenceSession
    outputs: list[str]         # one embedding output per member, in member order
    provider: str
    num_layers: int
    path: Path

    @property
    def config(self) -> SimpleNamespace:
        """What model info reads from a torch backbone's config."""
        return SimpleNamespace(num_hidden_layers=self.num_layers)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.outputs, {"input_ids": input_ids, "attention_mask": attention_mask})


def providers_for(device: torch.device) -> list[str]:
    """CUDA when asked for (or auto found a GPU) and this onnxruntime build has it; else CPU."""
    import onnxruntime as ort

    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError("--device cuda with --backend onnx needs onnxruntime-gpu with CUDA libraries "
                             f"(this onnxruntime has {ort.get_available_providers()})")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(graph: Path, device: torch.device, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # torch's thread count is what an operator already tunes (OMP_NUM_THREADS); ORT follows it
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.log_severity_level = 3  # warnings about unused initialisers are noise in a server log
    return ort.InferenceSession(str(graph), opts, providers=providers_for(device))


def read_record(path: str | Path) -> dict:
    path = Path(path)
    try:
        record = json.loads((path / RECORD).read_text())
    except FileNotFoundError:
        raise EnsembleFormatError(f"{path} is not an ONNX export (no {RECORD}); make one with "
                                  f"`rmserve export-onnx MODEL --out {path}`") from None
    except json.JSONDecodeError as e:
        raise EnsembleFormatError(f"{path / RECORD} is not valid JSON: {e}") from e
    if record.get("format") != FORMAT:
        raise EnsembleFormatError(f"{path / RECORD}: format is {record.get('format')!r}, expected {FORMAT!r}")
    return record


def load_onnx_model(path: str | Path, *, dtype: str = "auto", max_tokens: int | None = None,
                    device: str | torch.device = "cpu") -> RewardModel:
    """The exported directory as a RewardModel whose members' backbone is one onnxruntime graph."""
    from transformers import AutoTokenizer

    path = Path(path)
    record = read_record(path)
    if dtype not in ("auto", "float32"):
        raise ValueError(f"the ONNX export runs float32; --dtype {dtype} is not available with --backend onnx")
    try:
        manifest = EnsembleManifest.from_dict(record["ensemble"])
        outputs = [m["output"] for m in record["members"]]
    except (KeyError, TypeError) as e:
        raise EnsembleFormatError(f"{path / RECORD}: missing {e}") from e
    if len(outputs) != len(manifest.members):
        raise EnsembleFormatError(f"{path / RECORD}: {len(outputs)} graph outputs for {len(manifest.members)} members")
    graph_file = path / GRAPH
    if not graph_file.is_file():
        raise EnsembleFormatError(f"{path}: the graph {GRAPH} is missing")
    dev = resolve_device(device)
    try:
        session = open_session(graph_file, dev)
    except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
        raise EnsembleFormatError(f"cannot load the graph {graph_file}: {type(e).__name__}: {e}") from e
    graph = OnnxGraph(session, outputs, session.get_providers()[0], int(record["num_layers"]), path)
    tok = AutoTokenizer.from_pretrained(path / TOKENIZER)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    members = []
    for spec, info in zip(manifest.members, record["members"], strict=True):
        t = load_member(path, spec)
        if t.weight.shape[1] != int(info["hidden_size"]):
            raise EnsembleFormatError(f"member {spec.name}: heads expect hidden size {t.weight.shape[1]}, "
                                      f"the graph gives {info['hidden_size']}")
        bb = Backbone(model=graph, tokenizer=tok, pooling="last", hidden_size=int(info["hidden_size"]),
                      max_positions=int(record["max_positions"]), name=f"onnx:{record['backbone']}")
        members.append(Member(spec.name, bb, t.weight, t.bias, t.unc_factor, t.ood))
    limit = min(max_tokens or manifest.max_tokens, int(record["max_positions"]))
    return RewardModel(
        name=manifest.name, version=manifest.version, kind=manifest.kind, members=members,
        encoder=PromptEncoder(tok, limit, use_chat_template=manifest.chat_template),
        dtype=torch.float32, max_tokens=limit, uncertainty_penalty=manifest.uncertainty_penalty,
        shift=list(record["shift"]), scale=list(record["scale"]), source=str(path), training=manifest.training,
        ood=OodCalibration.from_dict(manifest.ood) if manifest.ood is not None and all(m.ood for m in members) else None,
    )


class OnnxEngine:
    """Scores token-id sequences through an exported graph: the torch engine's contract
    (`score(seqs) -> EngineOutput`) on right-padded, length-sorted batches."""

    def __init__(self, model: RewardModel, *, token_budget: int = 4096, max_batch: int = 256):
        graph = model.members[0].backbone.model
        if not isinstance(graph, OnnxGraph):
            raise ValueError("OnnxEngine serves a model loaded by load_onnx_model (--backend onnx)")
        self.model = model
        self.graph = graph
        self.token_budget = token_budget
        self.max_batch = max_batch
        self.pad = pad_token_id(model.encoder.tokenizer)

    @torch.inference_mode()
    def score(self, seqs: list[list[int]]) -> EngineOutput:
        if not seqs:
            raise ValueError("score() needs at least one sequence")
        n, members = len(seqs), self.model.members
        embeddings = [np.empty((n, m.backbone.hidden_size), dtype=np.float32) for m in members]
        stats = BatchStats()
        t0 = time.perf_counter()
        for idx in plan_batches([len(s) for s in seqs], self.token_budget, self.max_batch):
            batch = [seqs[i] for i in idx]
            ids, mask, _ = right_pad(batch, self.pad)
            for buf, out in zip(embeddings, self.graph(ids.numpy(), mask.numpy()), strict=True):
                buf[idx] = out
            stats.batches += 1
            stats.real_tokens += sum(map(len, batch))
            stats.padded_tokens += ids.numel()
        stats.forward_s = time.perf_counter() - t0
        ones = {"lengths": torch.ones(n, dtype=torch.long)}
        return engine_output([member_scores(m, torch.from_numpy(e)[:, None, :], ones)
                              for m, e in zip(members, embeddings, strict=True)], stats)


__all__ = ["FORMAT", "OnnxEngine", "OnnxGraph", "load_onnx_model", "read_record"]
