"""Training configuration: every knob of a run, recorded in the manifest and the checkpoint."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, TypedDict, get_args

# The fields that take a fixed set of strings; validation and the CLI's choices read these.
Kind = Literal["heads", "members"]                     # K heads on one backbone | K backbones
HeadSolver = Literal["adamw", "lbfgs"]                 # gradient steps | exact L2 logistic fit
ServeDtype = Literal["float32", "bfloat16", "float16"]  # what a manifest may name (service/engine/model.py DTYPES)
Device = Literal["auto", "cpu", "cuda"]
LabelerKind = Literal["human", "ai"]                   # store_filters["kind"]
AugmentKind = Literal["off_topic", "echo", "padded", "flattery", "filler", "scaffold"]  # training/augment.py
LengthDebias = Literal["none", "balance", "decorrelate", "balance+decorrelate"]        # training/length.py

SERVE_DTYPES: tuple[str, ...] = get_args(ServeDtype)
AUGMENT_KINDS: tuple[str, ...] = get_args(AugmentKind)
STORE_FILTERS: tuple[str, ...] = ("kind", "since", "tag", "labeler")


@dataclass(frozen=True)
class AugmentSpec:
    kind: str
    share: float  # fraction of the training prompts given one pair of this kind


def parse_augment(text: str | list[str] | None, default_share: float = 1.0) -> list[AugmentSpec]:
    """`off_topic,echo:0.5` -> specs; a kind without `:share` takes `default_share`."""
    if not text:
        return []
    items = text if isinstance(text, list) else str(text).split(",")
    specs: dict[str, AugmentSpec] = {}
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        kind, _, share_text = item.partition(":")
        kind = kind.strip()
        if kind not in AUGMENT_KINDS:
            raise ValueError(f"unknown augmentation kind {kind!r}; kinds: {', '.join(AUGMENT_KINDS)}")
        try:
            share = float(share_text) if share_text else float(default_share)
        except ValueError:
            raise ValueError(f"augmentation {item!r}: the share after ':' must be a number in (0, 1]") from None
        if not 0 < share <= 1:
            raise ValueError(f"augmentation {item!r}: the share must be in (0, 1], got {share}")
        specs[kind] = AugmentSpec(kind, share)
    return list(specs.values())


class StoreFilters(TypedDict, total=False):
    """Which rows of the preference store train (service/data/preferences.py Filters)."""

    kind: LabelerKind
    since: float       # unix seconds: labelled at or after
    tag: str
    labeler: str


# Fields that may change between a run and its resumption: they do not change what is trained
# (the data itself is checked by its fingerprint, not its path; with several files the fingerprint
# includes each pair's file, so another list of files is refused).
RESUMABLE_CHANGES = frozenset({
    "data", "out", "dev", "resume", "overwrite", "keep_checkpoint", "checkpoint_every_s", "log_every",
    "feature_cache", "strict", "device", "token_budget", "prefix_cache",
})


@dataclass
class TrainConfig:
    data: str | list[str]                       # JSONL preference file(s), concatenated ("" with from_store)
    out: str                                    # ensemble directory to write
    backbone: str = "builtin:smollm2-135m-instruct"
    dev: str | list[str] | None = None          # file(s) evaluated once at the end, for the report only
    kind: Kind = "heads"                        # heads | members
    num_heads: int = 5                          # K: heads (kind=heads) or members (kind=members)
    num_layers: int | None = None               # layer cut: use (and serve) only the first N blocks
    finetune_layers: int = 0                    # last N layers trained; 0 = frozen backbone; -1 = all
    lora_rank: int = 0                          # > 0: LoRA of this rank on those layers, merged at the end
    lora_alpha: float | None = None             # default 2 x rank
    prefix_cache: bool = True                   # run the frozen layers once, train on their cached output
    bootstrap: bool | None = None               # per-head bootstrap resample; default on for heads, off for members
    head_solver: HeadSolver = "adamw"           # adamw | lbfgs (frozen backbone only: exact L2 logistic fit)
    head_l2: float | None = None                # lbfgs: L2 strength; None = chosen by 5-fold CV on train
    epochs: int = 3
    lr: float = 1e-3                            # heads
    backbone_lr: float = 3e-5                   # fine-tuned layers / LoRA
    weight_decay: float = 0.01                  # heads only
    warmup_frac: float = 0.05
    batch_size: int = 16                        # pairs per micro-batch (2x sequences)
    grad_accum: int = 1
    max_grad_norm: float = 1.0                  # 0 disables clipping
    max_tokens: int = 1024                      # serving limit written to the manifest; training encodes with it
    serve_dtype: ServeDtype = "float32"         # serving dtype written to the manifest (what --dtype auto serves)
    seed: int = 0
    center_coef: float = 0.0
    lambda0: float = 1.0                        # epistemic prior: M = lambda0 I + sum e e^T
    calib_frac: float = 0.1                     # share of TRAIN held out to fit the temperature; 0 = none
    min_calib_pairs: int = 50                   # fewer held-out pairs than this: no temperature (reported)
    uncertainty_penalty: float = 1.0            # manifest default lambda for `conservative`
    ood_quantile: float | None = 0.99           # OOD flag threshold quantile (training/ood.py); None = no OOD stats
    ood_holdout: float = 0.25                   # share of pairs held out to calibrate that threshold
    device: Device = "auto"                     # auto | cpu | cuda
    token_budget: int = 4096                    # padded tokens per forward batch (features, final embeddings)
    feature_cache: str | None = None            # frozen-feature cache dir; None = $RMSERVE_CACHE/features; "" = off
    checkpoint_every_s: float = 300.0           # plus one at every epoch end
    log_every: int = 0                          # optimizer steps between step events; 0 = ~200 per run
    resume: bool = False
    overwrite: bool = False                     # replace an existing ensemble / checkpoint in `out`
    keep_checkpoint: bool = False               # keep <out>/checkpoint after success
    strict: bool = False                        # first malformed row raises
    name: str | None = None                     # manifest name; default: the out directory's name
    version: str | None = None                  # manifest version; default: UTC time + config hash
    from_store: str | None = None               # read the preferences from this store (SQLite) instead of `data`
    store_filters: StoreFilters | None = None   # kind (human|ai), since (unix s), tag, labeler
    augment: str = ""                           # KIND[:SHARE],... robust-training pairs (training/augment.py)
    augment_share: float = 1.0                  # share of the training prompts for a kind that names none
    augment_weight: float = 1.0                 # weight of every augmented pair
    length_debias: LengthDebias = "none"        # none | balance | decorrelate | balance+decorrelate (training/length.py)

    def __post_init__(self) -> None:
        problems = []
        for name in ("data", "dev"):
            files = _files(getattr(self, name))
            if files is None:
                problems.append(f"{name} must be a path or a list of paths, got {getattr(self, name)!r}")
            elif len(set(files)) < len(files):
                problems.append(f"{name} names a file twice: {sorted(f for f in files if files.count(f) > 1)[0]}")
        if self.ood_quantile is not None and not 0 < self.ood_quantile < 1:
            problems.append(f"ood_quantile must be in (0, 1) or None, got {self.ood_quantile}")
        if not 0 < self.ood_holdout < 1:
            problems.append(f"ood_holdout must be in (0, 1), got {self.ood_holdout}")
        for name, allowed in (("kind", Kind), ("head_solver", HeadSolver), ("serve_dtype", ServeDtype),
                              ("device", Device), ("length_debias", LengthDebias)):
            problem = _not_one_of(name, getattr(self, name), allowed)
            if problem:
                problems.append(problem)
        if self.num_heads < 1:
            problems.append("num_heads must be >= 1")
        # a Train RPC's options_json may hold any JSON: a string, null or NaN must be refused by name
        share, weight = self.augment_share, self.augment_weight
        if not _number(share) or not 0 < share <= 1:
            problems.append(f"augment_share must be a number in (0, 1], got {share!r}")
        if not _number(weight) or not 0 < weight < math.inf:
            problems.append(f"augment_weight must be a positive finite number, got {weight!r}")
        if not isinstance(self.augment, str) and not (
                isinstance(self.augment, list) and all(isinstance(a, str) for a in self.augment)):
            problems.append(f"augment must be KIND[:SHARE],... (text), got {self.augment!r}")
        else:
            try:
                parse_augment(self.augment, 1.0)
            except ValueError as e:
                problems.append(f"augment: {e}")
        if "decorrelate" in str(self.length_debias) and self.finetune_layers != 0:
            problems.append("length_debias=decorrelate constrains heads on frozen features: it needs "
                            "finetune_layers = 0 (use balance for trained layers)")
        if self.kind == "members" and self.finetune_layers == 0:
            problems.append("kind=members needs a trained backbone part (finetune_layers != 0): "
                            "frozen members would all be the same model")
        for name in ("epochs", "batch_size", "grad_accum", "max_tokens", "token_budget"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.lr <= 0 or self.backbone_lr <= 0:
            problems.append("learning rates must be positive")
        if self.lambda0 <= 0:
            problems.append("lambda0 must be positive")
        if not 0 <= self.calib_frac < 0.5:
            problems.append("calib_frac must be in [0, 0.5)")
        if self.num_layers is not None and self.num_layers < 1:
            problems.append("num_layers must be >= 1 (or None for every layer)")
        if self.head_solver == "lbfgs" and self.finetune_layers != 0:
            problems.append("head_solver=lbfgs fits heads on frozen features: it needs finetune_layers = 0")
        if self.head_solver == "lbfgs" and self.center_coef:
            problems.append("center_coef applies to gradient-trained heads; lbfgs heads are centred by the normalisation")
        if self.head_l2 is not None and self.head_l2 < 0:
            problems.append("head_l2 must be >= 0")
        if self.lora_rank < 0:
            problems.append("lora_rank must be >= 0")
        if self.lora_rank and self.finetune_layers == 0:
            problems.append("lora_rank needs finetune_layers != 0 (the layers LoRA goes on)")
        if bool(self.data) == bool(self.from_store):
            problems.append("give the preferences either as a file (data) or as a store (from_store), not both")
        if self.store_filters is not None and not isinstance(self.store_filters, dict):
            problems.append(f"store_filters must be an object of {', '.join(STORE_FILTERS)}, "
                            f"got {type(self.store_filters).__name__}")
        elif self.store_filters:
            unknown = sorted(set(self.store_filters) - set(STORE_FILTERS))
            if unknown:
                problems.append(f"store_filters: unknown {unknown}; known: {', '.join(STORE_FILTERS)}")
            if self.store_filters.get("kind") not in (None, *get_args(LabelerKind)):
                problems.append(f"store_filters kind must be {_alternatives(LabelerKind)}, "
                                f"got {self.store_filters.get('kind')!r}")
        if problems:
            raise ValueError("bad training config: " + "; ".join(problems))

    @property
    def data_files(self) -> list[str]:
        """The training files, in order (one or several; none with from_store): read `data` through this."""
        return _files(self.data) or []

    @property
    def dev_files(self) -> list[str]:
        """The dev files, in order (none, one or several): read `dev` through this."""
        return _files(self.dev) or []

    @property
    def use_bootstrap(self) -> bool:
        return self.kind == "heads" if self.bootstrap is None else self.bootstrap

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def differences(self, other: dict[str, Any]) -> list[str]:
        """Fields (outside RESUMABLE_CHANGES) where `other` differs: what forbids a resume."""
        mine = self.to_dict()
        return sorted(k for k in mine if k not in RESUMABLE_CHANGES and other.get(k) != mine[k])


def _files(value: Any) -> list[str] | None:
    """`data`/`dev` as a list: a path is one file, a list (or tuple) several, ""/None/[] none;
    None for anything else. The one place a single path and a list are made alike."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        return list(value)
    return None


def _number(value: Any) -> bool:
    """A real number (an int or a float, not a bool, not NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _alternatives(allowed: Any) -> str:
    """'a' or 'b' / one of 'a', 'b', 'c': the values of a Literal, as a message names them."""
    values = [repr(v) for v in get_args(allowed)]
    return " or ".join(values) if len(values) == 2 else "one of " + ", ".join(values)


def _not_one_of(name: str, value: Any, allowed: Any) -> str | None:
    """The problem with a field outside its Literal (None when it is one of them), naming both."""
    if value in get_args(allowed):
        return None
    return f"{name} must be {_alternatives(allowed)}, got {value!r}"
