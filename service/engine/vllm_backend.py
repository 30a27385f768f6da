"""`--backend vllm` (experimental): the forward on vLLM's pooling runner (tensor parallel), rmserve's heads on top.

Experimental: this backend has never run on a GPU (the only place vLLM runs); it is tested
against a fake of vLLM's `LLM.encode` (tests/test_backend_vllm.py) until a GPU run is recorded
in bench/results/ (docs/backends.md).

vLLM runs the backbone: `LLM(model, runner="pooling", convert=..., tensor_parallel_size=N)`,
fed token ids (`{"prompt_token_ids": ids}`, vLLM's TokensPrompt), batched and scheduled by
vLLM itself. What comes back per sequence:

- an rmserve ensemble: `convert="embed"` with the pooler set to the last token and no
  activation (`PoolerConfig(seq_pooling_type="LAST", use_activation=False)`: vLLM's embed
  pooler otherwise L2-normalises), i.e. the final-norm hidden state of the last token, the
  vector rmserve's heads read. `VllmTrunk` is the one engine loop's trunk (engine/contract.py):
  the engine applies every member's heads, the epistemic factor and the OOD statistics to
  those rows as on every backend (engine/heads.py), so `reward`, `std`, `min`,
  `conservative`, `epistemic` and `ood` mean what they mean on every backend;
- a one-label `*ForSequenceClassification` checkpoint: `convert="classify"`, same pooler
  settings, so the raw logit (no sigmoid) comes back and is the reward (a one-head ensemble
  whose "hidden state" is the logit and whose head is the identity).

The scheduler, auth, metrics, the HTTP front door and the run monitor stay rmserve's; rmserve's
own batching, packing and prefix sharing are replaced by vLLM's (its continuous batching
and, where enabled, prefix caching).

What vLLM cannot load, rmserve refuses with a message: members on different backbones or
with trained backbone tensors (members ensembles, LoRA), and encoders. A layer-cut backbone
(`num_layers`, the embedded default's 14 of 30) is served from a copy of the checkpoint that
holds only the layers it reads (`cut_checkpoint`, written once under $RMSERVE_CACHE/vllm-cut),
because vLLM loads every tensor of the checkpoint it is given.

vLLM is not a dependency of rmserve (it pins its own torch and CUDA stack): it is imported
when a model loads, and its absence is an error that says how to install it. The API used
here was read in vLLM 0.34.0's source (docs/big-models.md lists the files).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rmserve.service.engine.backbone import (
    BackboneInfo,
    cache_dir,
    is_encoder,
    quiet_transformers,
    resolve_builtin,
)
from rmserve.service.engine.contract import Embeddings, Engine, Trunk
from rmserve.service.engine.ensemble import (
    MANIFEST,
    EnsembleFormatError,
    load_member,
    read_manifest,
    resolve_backbone_path,
)
from rmserve.service.engine.errors import EngineUnavailable, InvalidInput, RMServeError
from rmserve.service.engine.heads import LastTokenIndex
from rmserve.service.engine.model import (
    DTYPES,
    Member,
    RewardModel,
    assemble_ensemble,
    resolve_device,
    resolve_dtype,
)
from rmserve.service.engine.tokenization import PromptEncoder

log = logging.getLogger(__name__)

INSTALL = ("install vLLM into the server's environment with the torch/CUDA build it pins "
           "(`pip install vllm`, or `pip install 'rmserve[vllm]'`); it needs a GPU")

# last-token pooling, no activation: the final hidden state (embed) or the raw logit (classify)
POOLER = {"seq_pooling_type": "LAST", "use_activation": False}


class VllmUnavailable(RMServeError, ImportError):
    """--backend vllm on a machine without vLLM."""


class VllmRequestFailed(RMServeError, RuntimeError):
    """vLLM failed a request (or a whole batch) for a reason other than the input itself."""


class VllmRetryable(VllmRequestFailed, EngineUnavailable):
    """A failure vLLM marks retryable: UNAVAILABLE to the caller, whose retry may succeed."""


@dataclass(kw_only=True)
class VllmBackbone(BackboneInfo):
    """A member's backbone on this backend: the checkpoint vLLM serves and the engine running it."""

    config: Any            # the Hugging Face config of the checkpoint vLLM serves
    llm: Any               # vllm.LLM (or an object with its `encode`); set once the engine starts
    task: str              # "embed" (hidden states for rmserve's heads) | "classify" (a seq-cls logit)
    source: str            # the directory vLLM loaded


# ------------------------------------------------------------------------ the vLLM engine


def llm_kwargs(source: str, *, task: str, dtype: torch.dtype, max_model_len: int, tensor_parallel_size: int = 1,
               gpu_memory_utilization: float | None = None) -> dict[str, Any]:
    """The keyword arguments of `vllm.LLM(...)` for one served checkpoint (pooler_config as a
    dict; `make_llm` turns it into vLLM's PoolerConfig)."""
    kw: dict[str, Any] = {
        "model": source, "runner": "pooling", "convert": task, "pooler_config": dict(POOLER),
        "dtype": next(k for k, v in DTYPES.items() if v == dtype), "max_model_len": int(max_model_len),
        "tensor_parallel_size": int(tensor_parallel_size),
    }
    if gpu_memory_utilization is not None:
        kw["gpu_memory_utilization"] = float(gpu_memory_utilization)
    return kw


def make_llm(**kw: Any) -> Any:
    """vllm.LLM(**kw), imported here: the one place rmserve touches vLLM's constructor."""
    try:
        import vllm
        from vllm.config import PoolerConfig
    except ImportError as e:
        raise VllmUnavailable(f"--backend vllm: vLLM is not installed ({e}); {INSTALL}") from e
    return vllm.LLM(pooler_config=PoolerConfig(**kw.pop("pooler_config")), **kw)


_LLMS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_LLMS_LOCK = threading.Lock()


def shared_llm(kw: dict[str, Any], factory: Callable[..., Any] | None = None) -> Any:
    """One vLLM engine per distinct configuration while a served model holds it: a hot swap
    to new heads on the same backbone reuses the running engine instead of starting a second
    one on the same GPUs (an engine nobody holds any more is released)."""
    factory = factory or make_llm
    key = (factory, json.dumps(kw, sort_keys=True, default=str))
    with _LLMS_LOCK:
        llm = _LLMS.get(key)
        if llm is None:
            llm = factory(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in kw.items()})
            with contextlib.suppress(TypeError):  # an object that cannot be weakly referenced is not shared
                _LLMS[key] = llm
        return llm


_ENCODE_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encode_lock(llm: Any) -> threading.Lock:
    """The lock every engine on `llm` holds around `encode`: vllm.LLM is not thread-safe, and during
    a hot swap the new version's warm-up and the old version's worker share one engine."""
    with _LLMS_LOCK:
        try:
            return _ENCODE_LOCKS.setdefault(llm, threading.Lock())
        except TypeError:  # not weakly referenceable (a test's fake): then it is not shared either
            return threading.Lock()


class VllmTrunk(Trunk):
    """vLLM as the engine's trunk: one `encode` call per batch (the engine plans one batch per
    scheduler batch; vLLM batches and schedules it), the pooled rows back for every member."""

    def __init__(self, model: RewardModel, llm: Any = None):
        bb = model.members[0].backbone
        if not isinstance(bb, VllmBackbone):
            raise ValueError("VllmEngine serves a model loaded by load_vllm_model (--backend vllm)")
        self.members = model.members
        self.llm = llm if llm is not None else bb.llm
        self.lock = encode_lock(self.llm)
        self.task = bb.task
        self.device = model.members[0].weight.device
        self.width = model.members[0].weight.shape[1]
        self.packed = True  # vLLM pads nothing: the batch statistics count real tokens

    def forward(self, batch: list[list[int]], prefix: None = None) -> Embeddings:
        prompts = [{"prompt_token_ids": list(s)} for s in batch]  # vllm.TokensPrompt is this TypedDict
        try:
            with self.lock:
                outs = self.llm.encode(prompts, pooling_task=self.task, use_tqdm=False)
        except Exception as e:
            raise VllmRequestFailed(f"vLLM failed a batch of {len(batch)} sequences: {type(e).__name__}: {e}") from e
        hidden = self._rows(batch, outs)
        return Embeddings([hidden] * len(self.members), LastTokenIndex.rows(len(batch), self.device))

    def _rows(self, seqs: list[list[int]], outs: list[Any]) -> torch.Tensor:
        """The pooled vector of each sequence [N, H] float32 on the heads' device, in input order,
        checked: one answer per prompt, for that prompt, without a request error, of the heads' width."""
        if len(outs) != len(seqs):
            raise VllmRequestFailed(f"vLLM answered {len(outs)} of {len(seqs)} sequences")
        rows = []
        for i, (s, o) in enumerate(zip(seqs, outs, strict=True)):
            err = getattr(o, "error", None)
            if err is not None:
                code, message = getattr(err, "code", "error"), getattr(err, "message", str(err))
                what = f"vLLM refused sequence {i} of {len(seqs)} ({len(s)} tokens): {code}: {message}"
                if code == "validation_error":  # the input itself (too long, bad ids...)
                    raise InvalidInput(what)
                if getattr(err, "retryable", False):
                    raise VllmRetryable(what + " (retryable)")
                raise VllmRequestFailed(what)
            if len(o.prompt_token_ids) != len(s):
                raise VllmRequestFailed(f"vLLM's answer {i} is for a prompt of {len(o.prompt_token_ids)} tokens, "
                                        f"not the {len(s)} sent")
            rows.append(torch.as_tensor(o.outputs.data).reshape(-1))
        hidden = torch.stack(rows).to(self.device, torch.float32)
        if hidden.shape[1] != self.width:
            raise VllmRequestFailed(f"vLLM returned vectors of size {hidden.shape[1]}; the heads read {self.width} "
                                    "(a pooler with a projection or a different task?)")
        return hidden


# ---------------------------------------------------------------------------- loading


def load_vllm_model(
    path: str | Path,
    *,
    dtype: str = "auto",
    max_tokens: int | None = None,
    device: str | torch.device = "cpu",
    tensor_parallel_size: int | None = None,
    gpu_memory_utilization: float | None = None,
    llm_factory: Callable[..., Any] | None = None,
) -> RewardModel:
    """`path`: an ensemble whose members all read one backbone without trained backbone
    tensors, or a one-label seq-cls checkpoint. Starts (or reuses) the vLLM engine.

    `device`: where rmserve's heads, epistemic factor and OOD statistics run on vLLM's output
    (default the CPU: [B, H] x [H, K] is small; `cuda` puts them on the first GPU, next to
    vLLM, which then needs `gpu_memory_utilization` below its default to leave them room).
    `llm_factory(**llm_kwargs)`: builds the engine (default `make_llm`; tests pass a fake).
    """
    path = Path(path)
    tp = int(tensor_parallel_size or 1)
    if (path / MANIFEST).is_file():
        model, source, task = _ensemble(path, dtype, max_tokens)
    elif (path / "config.json").is_file():
        model, source, task = _seqcls(path, dtype, max_tokens)
    else:
        raise EnsembleFormatError(f"{path} is neither an rmserve ensemble (no {MANIFEST}) nor a Hugging Face "
                                  "checkpoint (no config.json)")
    kw = llm_kwargs(source, task=task, dtype=model.dtype, max_model_len=model.max_tokens, tensor_parallel_size=tp,
                    gpu_memory_utilization=gpu_memory_utilization)
    llm = shared_llm(kw, llm_factory)
    for m in model.members:  # one backbone object: every member's
        m.backbone.llm = llm
    log.info("vLLM serves %s (%s, tensor parallel %d, %s)", source, task, tp, kw["dtype"])
    return model.heads_to(resolve_device(device))


def _ensemble(path: Path, dtype: str, max_tokens: int | None) -> tuple[RewardModel, str, str]:
    man = read_manifest(path)
    tensors = [load_member(path, spec) for spec in man.members]
    sources = {(resolve_backbone_path(path, s.backbone), s.num_layers) for s in man.members}
    if len(sources) > 1:
        raise EnsembleFormatError(f"{path}: --backend vllm serves members on one backbone; these read "
                                  f"{sorted(map(str, sources))} (serve them with --backend torch or accelerate)")
    trained = [s.name for s, t in zip(man.members, tensors, strict=True) if t.delta]
    if trained:
        raise EnsembleFormatError(f"{path}: members {trained} carry trained backbone tensors, which vLLM would not "
                                  "apply; serve them with --backend torch or accelerate")
    ((source, num_layers),) = sources
    directory = resolve_builtin(source.removeprefix("builtin:")) if source.startswith("builtin:") else Path(source)
    if not (directory / "config.json").is_file():
        raise EnsembleFormatError(f"{path}: backbone {source!r}: no checkpoint there")
    served = cut_checkpoint(directory, num_layers) if num_layers is not None else directory
    config, tok = _config_and_tokenizer(served)
    if is_encoder(config):
        raise EnsembleFormatError(f"{path}: --backend vllm serves decoders (last-token pooling); {config.model_type} "
                                  "is an encoder")
    bb = VllmBackbone(config=config, llm=None, task="embed", source=str(served), tokenizer=tok, pooling="last",
                      hidden_size=int(config.hidden_size), max_positions=_max_positions(config), name=source,
                      layers=int(config.num_hidden_layers), num_layers=num_layers)
    members = [Member(spec.name, bb, t.weight, t.bias, t.unc_factor, t.ood)
               for spec, t in zip(man.members, tensors, strict=True)]
    for m in members:
        if m.weight.shape[1] != bb.hidden_size:
            raise EnsembleFormatError(f"member {m.name}: heads expect hidden size {m.weight.shape[1]}, "
                                      f"backbone has {bb.hidden_size}")
    torch_dtype = resolve_dtype(dtype, man.dtype, torch.device("cuda"))  # vLLM runs on GPUs
    return assemble_ensemble(path, man, members, torch_dtype, max_tokens), str(served), "embed"


def _seqcls(path: Path, dtype: str, max_tokens: int | None) -> tuple[RewardModel, str, str]:
    """A one-label seq-cls checkpoint: vLLM's classify pooler gives the logit, which is the reward."""
    config, tok = _config_and_tokenizer(path)
    archs = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs) or config.num_labels != 1:
        raise EnsembleFormatError(f"{path}: a plain checkpoint must be a *ForSequenceClassification with one label "
                                  f"(got architectures={archs}, num_labels={config.num_labels})")
    if is_encoder(config):
        raise EnsembleFormatError(f"{path}: --backend vllm serves decoders; {config.model_type} is an encoder")
    default = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    torch_dtype = resolve_dtype(dtype, default if default in DTYPES else "float32", torch.device("cuda"))
    limit = min(max_tokens or 2048, _max_positions(config))
    bb = VllmBackbone(config=config, llm=None, task="classify", source=str(path), tokenizer=tok, pooling="last",
                      hidden_size=1, max_positions=_max_positions(config), name=str(path),
                      layers=int(config.num_hidden_layers))
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:8]
    model = RewardModel(  # the logit is a 1-vector; the identity head makes it the reward
        name=path.name, version=f"hf-{digest}", kind="heads",
        members=[Member("member0", bb, torch.ones(1, 1), torch.zeros(1), None)],
        encoder=PromptEncoder(tok, limit), dtype=torch_dtype, max_tokens=limit,
        uncertainty_penalty=0.0, shift=[0.0], scale=[1.0], source=str(path),
    )
    return model, str(path), "classify"


def _config_and_tokenizer(directory: Path):
    from transformers import AutoConfig, AutoTokenizer

    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(directory)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return AutoConfig.from_pretrained(directory), tok


def _max_positions(config) -> int:
    return int(getattr(config, "max_position_embeddings", 2048) or 2048)


# ------------------------------------------------------------------- layer-cut checkpoints

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def cut_checkpoint(source: str | Path, num_layers: int, root: str | Path | None = None) -> Path:
    """A copy of the safetensors checkpoint `source` holding only its first `num_layers` blocks
    (and everything else: embeddings, final norm, tokenizer), with the config cut to match:
    what a layer-cut member reads, in a form vLLM loads. Written once (atomically) under
    `root` (default $RMSERVE_CACHE/vllm-cut) and reused; `source` itself when nothing is cut."""
    source = Path(source)
    config = json.loads((source / "config.json").read_text())
    total = int(config["num_hidden_layers"])
    if not 1 <= num_layers <= total:
        raise EnsembleFormatError(f"{source}: num_layers must be in [1, {total}], got {num_layers}")
    if num_layers == total:
        return source
    weights = sorted(source.glob("*.safetensors"))
    if not weights:
        raise EnsembleFormatError(f"{source}: a layer cut for vLLM needs safetensors weights")
    stamp = [str(source.resolve()), num_layers] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in weights]
    digest = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:12]
    out = Path(root or cache_dir() / "vllm-cut") / f"{source.name}-{num_layers}of{total}-{digest}"
    if (out / "config.json").is_file():
        return out
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        kept: dict[str, str] = {}
        for f in weights:
            with safe_open(f, "pt") as st:
                names = [k for k in st.keys() if not ((m := _LAYER.search(k)) and int(m.group(1)) >= num_layers)]  # noqa: SIM118
                tensors = {k: st.get_tensor(k) for k in names}
                meta = st.metadata() or {"format": "pt"}
            if tensors:
                save_file(tensors, staging / f.name, metadata=meta)
                kept.update(dict.fromkeys(tensors, f.name))
        index = source / "model.safetensors.index.json"
        for f in source.iterdir():  # tokenizer, generation config...: everything but the weights
            if f.is_file() and f.suffix not in (".safetensors", ".bin", ".pt", ".pth") and f != index \
                    and f.name != "config.json":
                shutil.copy2(f, staging / f.name)
        if index.is_file():
            idx = json.loads(index.read_text())
            idx["weight_map"] = kept
            (staging / index.name).write_text(json.dumps(idx, indent=2))
        config["num_hidden_layers"] = num_layers
        if isinstance(config.get("layer_types"), list):
            config["layer_types"] = config["layer_types"][:num_layers]
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        for f in staging.iterdir():  # durable before it is visible: a crash must not publish a torn copy
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.replace(staging, out)
        except OSError:  # another process published it first (a non-empty target): use theirs
            if not (out / "config.json").is_file():
                raise
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote %s: the first %d of %d layers of %s, for vLLM", out, num_layers, total, source)
    return out


class VllmEngine(Engine):
    """`score(seqs) -> EngineOutput` over a model loaded by `load_vllm_model`: the one engine loop
    over a VllmTrunk, one batch per call (vLLM sizes its own: max_num_batched_tokens).
    `llm`: the vLLM engine to use instead of the model's (tests pass a fake)."""

    def __init__(self, model: RewardModel, *, token_budget: int | None = None, llm: Any = None):
        del token_budget  # vLLM sizes its own batches
        super().__init__(model, [VllmTrunk(model, llm)], token_budget=None, max_batch=None)


__all__ = [
    "POOLER",
    "VllmBackbone",
    "VllmEngine",
    "VllmRequestFailed",
    "VllmTrunk",
    "VllmUnavailable",
    "cut_checkpoint",
    "llm_kwargs",
    "load_vllm_model",
    "make_llm",
    "shared_llm",
]
