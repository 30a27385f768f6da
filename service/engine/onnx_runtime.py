"""The onnx backend: a directory written by `rmserve export-onnx`, run by onnxruntime.

```
exported/
  onnx.json                    # FORMAT below: the ensemble's facts, the graph's outputs, the check
  model.onnx (+ .data)         # input_ids, attention_mask [B, T] -> each member's last-token embedding [B, H]
  tokenizer/                   # the backbone's tokenizer and chat template
  member0/heads.safetensors    # heads with normalisation folded in; uncertainty, ood as in an ensemble
```

The graph stops at the embeddings the heads read, so this backend is a trunk of the one
engine loop (engine/contract.py): `OnnxTrunk.forward` runs a right-padded batch (the graph
reads each sequence's last real token from its attention mask) and returns the members'
last-token rows; planning under the token budget, the heads, statistics, the epistemic term
and the OOD score are the engine's, as on every backend. There is no KV cache in the graph,
so GRPO prefixes are not shared on this backend.

Experimental on CUDA: the CUDA execution provider (onnxruntime-gpu) has never run here on a
GPU; the CPU provider is tested and benchmarked (docs/backends.md).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rmserve.service.engine.backbone import BackboneInfo
from rmserve.service.engine.contract import Embeddings, Engine, Trunk
from rmserve.service.engine.ensemble import EnsembleFormatError, EnsembleManifest, load_member
from rmserve.service.engine.heads import LastTokenIndex
from rmserve.service.engine.model import Member, RewardModel, resolve_device
from rmserve.service.engine.ood import OodCalibration
from rmserve.service.engine.padding import pad_token_id, right_pad
from rmserve.service.engine.tokenization import PromptEncoder

log = logging.getLogger(__name__)

FORMAT = "rmserve-onnx/1"
RECORD = "onnx.json"
GRAPH = "model.onnx"
TOKENIZER = "tokenizer"


@dataclass
class OnnxGraph:
    """An onnxruntime session over an exported graph."""

    session: object            # onnxruntime.InferenceSession
    outputs: list[str]         # one embedding output per member, in member order
    provider: str
    path: Path

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.outputs, {"input_ids": input_ids, "attention_mask": attention_mask})


@dataclass(kw_only=True)
class OnnxBackbone(BackboneInfo):
    """A member's backbone on this backend: the graph that computes its embeddings."""

    graph: OnnxGraph


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
    graph = OnnxGraph(session, outputs, session.get_providers()[0], path)
    tok = AutoTokenizer.from_pretrained(path / TOKENIZER)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    members = []
    for spec, info in zip(manifest.members, record["members"], strict=True):
        t = load_member(path, spec)
        if t.weight.shape[1] != int(info["hidden_size"]):
            raise EnsembleFormatError(f"member {spec.name}: heads expect hidden size {t.weight.shape[1]}, "
                                      f"the graph gives {info['hidden_size']}")
        bb = OnnxBackbone(graph=graph, tokenizer=tok, pooling="last", hidden_size=int(info["hidden_size"]),
                          max_positions=int(record["max_positions"]), name=f"onnx:{record['backbone']}",
                          layers=int(record["num_layers"]))
        members.append(Member(spec.name, bb, t.weight, t.bias, t.unc_factor, t.ood))
    limit = min(max_tokens or manifest.max_tokens, int(record["max_positions"]))
    return RewardModel(
        name=manifest.name, version=manifest.version, kind=manifest.kind, members=members,
        encoder=PromptEncoder(tok, limit, use_chat_template=manifest.chat_template),
        dtype=torch.float32, max_tokens=limit, uncertainty_penalty=manifest.uncertainty_penalty,
        shift=list(record["shift"]), scale=list(record["scale"]), source=str(path), training=manifest.training,
        ood=OodCalibration.from_dict(manifest.ood) if manifest.ood is not None and all(m.ood for m in members) else None,
    )


class OnnxTrunk(Trunk):
    """The exported graph as the engine's trunk: right-padded batches in, each member's
    last-token rows out (on the host: the heads run on the CPU)."""

    def __init__(self, model: RewardModel):
        bb = model.members[0].backbone
        if not isinstance(bb, OnnxBackbone):
            raise ValueError("OnnxEngine serves a model loaded by load_onnx_model (--backend onnx)")
        self.graph = bb.graph
        self.members = model.members
        self.device = torch.device("cpu")
        self.pad = pad_token_id(model.encoder.tokenizer)

    def forward(self, batch: list[list[int]], prefix: None = None) -> Embeddings:
        ids, mask, _ = right_pad(batch, self.pad)
        rows = [torch.from_numpy(out) for out in self.graph(ids.numpy(), mask.numpy())]
        return Embeddings(rows, LastTokenIndex.rows(len(batch)))


class OnnxEngine(Engine):
    """Scores token-id sequences through an exported graph: the one engine loop over an OnnxTrunk."""

    def __init__(self, model: RewardModel, *, token_budget: int = 4096, max_batch: int = 256):
        super().__init__(model, [OnnxTrunk(model)], token_budget=token_budget, max_batch=max_batch)


__all__ = ["FORMAT", "OnnxBackbone", "OnnxEngine", "OnnxGraph", "OnnxTrunk", "load_onnx_model", "read_record"]
