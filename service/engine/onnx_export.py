"""`rmserve export-onnx`: a served model as an ONNX graph plus its heads (onnx_runtime.py reads it).

The graph is the backbone forward up to each member's last-token embedding, with
dynamic batch and sequence axes; members sharing a trunk are one graph with one
output per member. It is exported by torch's dynamo exporter (`torch.onnx.export(...,
dynamo=True)`), then checked against the torch path: the same sequences scored by
both backends, the largest difference of any head's reward (and OOD score) recorded
in onnx.json, and the export refused when it exceeds `max_diff`.

`quantize="int8"` stores the graph's matmul weights as 8-bit blocks (onnxruntime's
MatMulNBits, weight-only, symmetric, 32 per block) computed with int8 dot products
(accuracy level 4): faster on a CPU without native bf16, at a measured cost in score
accuracy (bench/results/onnx-*.md) that the check records like any other difference.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rmserve.service.engine.ensemble import (
    DIR_MODE,
    EnsembleFormatError,
    EnsembleManifest,
    MemberSpec,
    MemberTensors,
    atomic_write_bytes,
    save_member,
)
from rmserve.service.engine.errors import InvalidInput
from rmserve.service.engine.heads import EngineOutput
from rmserve.service.engine.model import RewardModel, load_model
from rmserve.service.engine.onnx_runtime import (
    FORMAT,
    GRAPH,
    RECORD,
    TOKENIZER,
    OnnxEngine,
    load_onnx_model,
)
from rmserve.service.engine.scoring import ScoringEngine, families

log = logging.getLogger(__name__)

OPSET = 18
QUANTIZE = ("none", "int8")
INT8_BLOCK = 32  # weights per quantisation block: finer blocks keep more accuracy, cost little speed


class ExportGraph(torch.nn.Module):
    """input_ids, attention_mask [B, T] (right-padded) -> each member's embedding [B, H]: what
    its heads read (the last real token; an encoder's pooled first token)."""

    def __init__(self, model: RewardModel):
        super().__init__()
        self.families = families(model)
        # outputs in the manifest's member order (families group members by backbone, which may reorder them)
        order = [id(m) for f in self.families for m in f.members]
        self.order = [order.index(id(m)) for m in model.members]
        # registered, so that export sees every backbone's and top's weights as the module's own
        self.backbones = torch.nn.ModuleList([f.backbone.model for f in self.families])
        self.tops = torch.nn.ModuleList([m.top.module for f in self.families for m in f.members if m.top is not None])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        last = attention_mask.sum(1) - 1
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        out: list[torch.Tensor] = []
        for fam in self.families:
            if fam.backbone.pooling == "cls":
                o = fam.backbone.model(**kwargs)
                pooled = o.pooler_output if getattr(o, "pooler_output", None) is not None else o.last_hidden_state[:, 0]
                out.append(pooled)
                continue
            out.extend(h[rows, last] for h in fam.forward(kwargs))
        return tuple(out[i] for i in self.order)


def sample_sequences(model: RewardModel, n: int = 24, seed: int = 0) -> list[list[int]]:
    """What the check scores: conversations through the model's own template, and random token
    ids of lengths from 1 to the model's limit (short and long, padding in every batch)."""
    rng = random.Random(seed)
    enc = model.encoder
    talk = [("Hello", "Hi! How can I help?"),
            ("What is 17 times 23?", "17 times 23 is 391."),
            ("Write a haiku about rain.", "Soft rain on the roof / the gutters hum their one note / night drinks it all in"),
            ("Explain recursion briefly.", "A function that calls itself on a smaller input until a base case stops it.")]
    seqs = []
    for p, r in talk:
        with contextlib.suppress(InvalidInput):  # longer than a small model's limit: the random ones cover it
            seqs.append(enc.prompt_response(p, r).ids)
    top = min(enc.max_tokens, 384)
    vocab = enc.vocab_size
    while len(seqs) < n:
        length = rng.choice([1, 2, 3, rng.randint(min(4, top), min(64, top)), rng.randint(min(64, top), top)])
        seqs.append([rng.randrange(3, vocab) for _ in range(min(length, top))])
    return seqs


def max_differences(a: EngineOutput, b: EngineOutput) -> dict[str, float]:
    """The largest absolute difference of each output two backends give for the same sequences."""
    diffs = {"rewards": float(np.abs(a.rewards - b.rewards).max()),
             "mean": float(np.abs(a.mean - b.mean).max()),
             "std": float(np.abs(np.sqrt(a.var) - np.sqrt(b.var)).max())}
    if a.epistemic is not None and b.epistemic is not None:
        diffs["epistemic"] = float(np.abs(a.epistemic - b.epistemic).max())
    if a.ood_score is not None and b.ood_score is not None:
        diffs["ood_score"] = float(np.abs(a.ood_score - b.ood_score).max())
    return diffs


def export_onnx(source: str | Path, out: str | Path, *, max_diff: float | None = None, samples: int = 24,
                quantize: str = "none", force: bool = False, progress=print) -> dict:
    """Export the model at `source` (an ensemble directory or a seq-cls checkpoint) to `out`.

    `max_diff`: the largest reward (or OOD score) difference from torch the export accepts;
    default 1e-3, or a tenth of the torch rewards' std over the check's samples with int8.

    Written to a temporary sibling and renamed into place only after the check passed, so
    `out` is either a complete, checked export or absent. Returns the onnx.json record.
    """
    import onnx
    import onnxruntime

    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):  # per-initialiser INFO lines by the thousand
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    progress(f"loading {source} (float32, CPU)")
    # the checkpoint's own modules and attention: the graph holds plain ops (no compiled loop, no
    # rmserve CPU kernel, which ONNX has no translation for)
    model = load_model(source, dtype="float32", device="cpu", fused=False)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    stage.chmod(DIR_MODE)
    try:
        record = _export_into(model, stage, progress)
        if quantize == "int8":
            record["quantize"] = quantize_int8(stage / GRAPH, progress)
        _write_record(stage, record)
        progress(f"checking {samples} sequences against the torch path")
        seqs = sample_sequences(model, samples)
        want = ScoringEngine(model, min_shared_prefix=0).score(seqs)
        exported = load_onnx_model(stage)
        got = OnnxEngine(exported).score(seqs)
        diffs = max_differences(want, got)
        worst = max(diffs["rewards"], diffs.get("ood_score", 0.0))
        if max_diff is None:
            max_diff = 1e-3 if quantize == "none" else 0.1 * float(want.rewards.std())
        record["check"] = {
            "samples": len(seqs), "max_abs_diff": worst, "max_abs_diff_by_output": diffs,
            "tolerance": max(1e-4, 10 * worst), "reference": "torch ScoringEngine, float32, CPU",
            "max_diff": max_diff, "reward_std": float(want.rewards.std()),
        }
        record["versions"] = {"torch": torch.__version__, "onnx": onnx.__version__,
                              "onnxruntime": onnxruntime.__version__, "opset": OPSET}
        _write_record(stage, record)
        if worst > max_diff:
            raise EnsembleFormatError(
                f"the exported graph differs from the torch path by {worst:.3g} (rewards {diffs['rewards']:.3g}) "
                f"on {len(seqs)} sample sequences, above --max-diff {max_diff:g}; not written to {out}")
        if out.exists():  # the old export stays whole until the new one is in place
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            stage.rename(out)
            shutil.rmtree(old)
        else:
            stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    progress(f"wrote {out}: largest difference from torch {worst:.3g} over {len(seqs)} sequences")
    return record


EXTERNAL_DATA_ABOVE = 1_800_000_000   # bytes of weights past which the graph keeps them in model.onnx.data


def quantize_int8(graph: Path, progress) -> dict:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    progress(f"quantising the matmul weights to int8 (blocks of {INT8_BLOCK})")
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    q = MatMulNBitsQuantizer(str(graph), bits=8, block_size=INT8_BLOCK, is_symmetric=True, accuracy_level=4)
    q.process()
    # torch writes a graph over 2 GB with its weights beside it (model.onnx.data); they are in
    # memory now and go: onnx would append the int8 weights to that file, not replace it
    graph.with_name(graph.name + ".data").unlink(missing_ok=True)
    big = sum(t.ByteSize() for t in q.model.model.graph.initializer) > EXTERNAL_DATA_ABOVE
    q.model.save_model_to_file(str(graph), use_external_data_format=big)  # protobuf stops at 2 GB
    return {"method": "int8 weight-only (onnxruntime MatMulNBits, symmetric)", "block_size": INT8_BLOCK,
            "accuracy_level": 4}


@contextlib.contextmanager
def _export_errors(model: RewardModel):
    """torch.onnx's failures as an error that names the model (its own message is pages long)."""
    try:
        yield
    except Exception as e:  # TorchExportError, ConversionError, AssertionError from the tracer...
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise EnsembleFormatError(
            f"torch.onnx could not export {model.source} ({len(model.members)} members on "
            f"{len({id(m.backbone) for m in model.members})} backbones): {type(e).__name__}: {first}. "
            "Serve it with --backend torch.") from e


def _write_record(directory: Path, record: dict) -> None:
    atomic_write_bytes(directory / RECORD, (json.dumps(record, indent=2) + "\n").encode())


def _export_into(model: RewardModel, stage: Path, progress) -> dict:
    graph = ExportGraph(model).eval()
    names = [f"embedding_{m.name}" for m in model.members]
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 8, 9, 0, 0, 0]])
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    progress(f"exporting {len(model.members)} member(s) of {model.backbone_name} with torch.onnx (dynamo)")
    t0 = time.perf_counter()
    with torch.inference_mode(False), torch.no_grad(), _export_errors(model):
        program = torch.onnx.export(
            graph, (ids, mask), dynamo=True, opset_version=OPSET, optimize=True, verbose=False,
            input_names=["input_ids", "attention_mask"], output_names=names,
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
        )
    program.save(str(stage / GRAPH))
    progress(f"exported in {time.perf_counter() - t0:.0f} s")
    model.encoder.tokenizer.save_pretrained(stage / TOKENIZER)
    specs = []
    for m in model.members:  # heads as served: normalisation already folded in
        spec = MemberSpec(name=m.name, backbone="onnx")
        save_member(stage, spec, MemberTensors(m.weight.cpu(), m.bias.cpu(), unc_factor=m.unc_factor, ood=m.ood))
        specs.append(spec)
    manifest = EnsembleManifest(
        name=model.name, version=model.version, kind=model.kind, members=specs,
        uncertainty_penalty=model.uncertainty_penalty, max_tokens=model.max_tokens, dtype="float32",
        chat_template=model.encoder.templated, training=model.training,
        ood=None if model.ood is None else {"threshold": model.ood.threshold, "quantile": model.ood.quantile,
                                            "calibrated_on": model.ood.calibrated_on,
                                            "num_calibration": model.ood.num_calibration},
    )
    return {
        "format": FORMAT, "source": model.source, "backbone": model.backbone_name,
        "num_layers": model.backbone_layers, "max_positions": min(m.backbone.max_positions for m in model.members),
        "shift": model.shift, "scale": model.scale, "ensemble": manifest.to_dict(),
        "members": [{"name": m.name, "output": n, "hidden_size": m.backbone.hidden_size}
                    for m, n in zip(model.members, names, strict=True)],
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


__all__ = ["ExportGraph", "export_onnx", "max_differences", "sample_sequences"]
