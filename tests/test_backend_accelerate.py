"""`--backend accelerate` (service/engine/sharded.py): one model split over devices by accelerate's
device_map, scored by the torch backend's engine.

No GPU here, so the split is as far as a CPU-only machine allows: modules on "cpu" and on
"disk" (offloaded: their weights live in an offload folder and are brought in by accelerate's
hooks for their turn, exactly as "cpu" modules are brought to the GPU on a GPU node). The
hooks, the activations crossing them, the engine's input device and the placement of the heads
and of members' own layers are exercised; moving activations between two GPUs is not (that
awaits a GPU: docs/big-models.md). Scores must equal the unsplit torch backend's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rmserve.service.engine.backends import BACKENDS, backend
from rmserve.service.engine.ensemble import (
    EnsembleFormatError,
    EnsembleManifest,
    MemberSpec,
    MemberTensors,
    save_member,
    write_manifest,
)
from rmserve.service.engine.model import load_model
from rmserve.service.engine.scoring import ScoringEngine
from rmserve.service.engine.sharded import (
    load_sharded_model,
    parse_device_map,
    parse_max_memory,
    sharded_engine,
)
from tests.helpers import assert_same_scores as _assert_same

H = 32

# the tiny ensemble's bare LlamaModel: two blocks, the second offloaded
SPLIT = {"embed_tokens": "cpu", "rotary_emb": "cpu", "layers.0": "cpu", "layers.1": "disk", "norm": "cpu"}


def _seqs(n: int = 11, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(5, 250, int(rng.integers(2, 40))).tolist() for _ in range(n)]
    prompt = rng.integers(5, 250, 24).tolist()  # a GRPO group: the engine encodes the prompt once
    return seqs + [prompt + rng.integers(5, 250, int(rng.integers(1, 9))).tolist() for _ in range(4)]


def _offloaded(model: torch.nn.Module, prefix: str) -> bool:
    return all(p.device.type == "meta" for n, p in model.named_parameters() if n.startswith(prefix))


def test_the_backend_is_registered_under_its_flag_name():
    from rmserve.service.server.config import BACKEND_NAMES

    assert set(BACKEND_NAMES) == set(BACKENDS)
    assert backend("accelerate").name == "accelerate"


@pytest.mark.parametrize("packing", ["on", "off"])
def test_a_split_model_scores_what_the_torch_backend_scores(tiny_ensemble, packing):
    model = load_sharded_model(tiny_ensemble, device_map=SPLIT)
    bb = model.members[0].backbone.model
    assert bb.hf_device_map == SPLIT
    assert _offloaded(bb, "layers.1.") and not _offloaded(bb, "layers.0.")  # really split, hooks in charge
    assert model.members[0].weight.device.type == "cpu"
    engine = sharded_engine(model, packing=packing, token_budget=128)
    assert engine.packs(model.members[0]) == (packing == "on")
    seqs = _seqs()
    want = ScoringEngine(load_model(tiny_ensemble, dtype="float32"), packing=packing, token_budget=128).score(seqs)
    got = engine.score(seqs)
    _assert_same(got, want)
    assert got.stats.real_tokens == want.stats.real_tokens  # the prefix group was shared on both


def test_a_layer_cut_is_made_before_loading(tiny_llama4_backbone, tmp_path):
    """The layers past the cut are never loaded, so the split places only the layers served."""
    g = torch.Generator().manual_seed(5)
    spec = MemberSpec(name="m", backbone=str(tiny_llama4_backbone), num_layers=2)
    save_member(tmp_path, spec, MemberTensors(weight=torch.randn(3, H, generator=g), bias=torch.randn(3, generator=g)))
    write_manifest(tmp_path, EnsembleManifest(name="cut", version="v1", kind="heads", members=[spec], max_tokens=64))
    split = {"embed_tokens": "cpu", "rotary_emb": "cpu", "layers.0": "disk", "layers.1": "cpu", "norm": "cpu"}
    model = load_sharded_model(tmp_path, device_map=split)
    bb = model.members[0].backbone.model
    assert len(bb.layers) == 2 and bb.config.num_hidden_layers == 2 and model.backbone_layers == 2
    seqs = _seqs(seed=1)
    _assert_same(sharded_engine(model).score(seqs), ScoringEngine(load_model(tmp_path, dtype="float32")).score(seqs))


def _members_ensemble(out, base, *, with_ood: bool):
    """Two members on one 4-layer base, each with its own trained copy of layer 3 (+ norm): they
    share a trunk (engine/trunk.py); OOD statistics on both, and a calibration."""
    weights = load_file(base / "model.safetensors")
    g = torch.Generator().manual_seed(9)
    specs = []
    for name in ("a", "b"):
        delta = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in weights.items()
                 if k.startswith("layers.3.") or k == "norm.weight"}
        spec = MemberSpec(name=name, backbone=str(base))
        ood = None
        if with_ood:
            from rmserve.service.engine.ood import OodStats

            ood = OodStats(torch.randn(H, generator=g) * 0.1, torch.eye(H) + 0.01 * torch.randn(H, H, generator=g))
        save_member(out, spec, MemberTensors(weight=torch.randn(2, H, generator=g), bias=torch.randn(2, generator=g),
                                             delta=delta, unc_factor=torch.randn(H, H, generator=g) / H, ood=ood))
        specs.append(spec)
    write_manifest(out, EnsembleManifest(
        name="members", version="v1", kind="members", members=specs, max_tokens=64,
        ood={"threshold": 1.5, "quantile": 0.98, "calibrated_on": "test"} if with_ood else None))
    return out


def test_members_sharing_a_split_trunk(tiny_llama4_backbone, tmp_path):
    """The trunk is split (its first layers offloaded); each member's own copy of layer 3 goes where
    layer 3 runs. Scores, epistemic and OOD equal the unsplit engine's."""
    path = _members_ensemble(tmp_path / "e", tiny_llama4_backbone, with_ood=True)
    split = {"embed_tokens": "cpu", "rotary_emb": "cpu", "layers.0": "disk", "layers.1": "disk",
             "layers.2": "cpu", "layers.3": "cpu", "norm": "cpu"}
    model = load_sharded_model(path, device_map=split)
    assert model.members[0].backbone is model.members[1].backbone  # one trunk
    assert [m.top.start for m in model.members] == [3, 3]
    for m in model.members:  # the copies run without the dispatch hooks they were copied with
        assert not any(hasattr(mod, "_hf_hook") for mod in m.top.module.modules())
    seqs = _seqs(seed=2)
    want = ScoringEngine(load_model(path, dtype="float32")).score(seqs)
    got = sharded_engine(model).score(seqs)
    assert got.ood_score is not None and got.epistemic is not None
    _assert_same(got, want)


def test_a_members_own_layers_cannot_be_offloaded(tiny_llama4_backbone, tmp_path):
    path = _members_ensemble(tmp_path / "e", tiny_llama4_backbone, with_ood=False)
    split = {"embed_tokens": "cpu", "rotary_emb": "cpu", "layers.0": "cpu", "layers.1": "cpu",
             "layers.2": "cpu", "layers.3": "disk", "norm": "cpu"}
    with pytest.raises(EnsembleFormatError, match="offloaded"):
        load_sharded_model(path, device_map=split)


def test_a_seqcls_checkpoint_split(tiny_llama_seqcls):
    split = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
             "model.layers.1": "cpu", "model.norm": "cpu", "score": "cpu"}
    model = load_sharded_model(tiny_llama_seqcls, device_map=split)
    seqs = _seqs(seed=3)
    _assert_same(sharded_engine(model).score(seqs), ScoringEngine(load_model(tiny_llama_seqcls, dtype="float32")).score(seqs))


def test_a_strategy_on_a_machine_without_gpus_keeps_the_model_whole(tiny_ensemble):
    """`auto` over no GPU is the CPU alone: no hooks, the plain engine path."""
    model = load_sharded_model(tiny_ensemble)
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: auto places the model there")
    bb = model.members[0].backbone.model
    assert set((getattr(bb, "hf_device_map", None) or {"": "cpu"}).values()) == {"cpu"}
    assert not any(hasattr(mod, "_hf_hook") for mod in bb.modules())
    seqs = _seqs(seed=4)
    _assert_same(sharded_engine(model).score(seqs), ScoringEngine(load_model(tiny_ensemble, dtype="float32")).score(seqs))


def test_bf16_on_the_cpu_is_the_torch_backends(tiny_ensemble):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ValueError, match="float32 only"):
        load_sharded_model(tiny_ensemble, dtype="bfloat16", device_map=SPLIT)


def test_device_map_and_max_memory_parsing(tmp_path):
    assert parse_device_map(None) == "auto" and parse_device_map("balanced") == "balanced"
    assert parse_device_map('{"layers.0": 0, "layers.1": 1}') == {"layers.0": 0, "layers.1": 1}
    f = tmp_path / "map.json"
    f.write_text(json.dumps(SPLIT))
    assert parse_device_map(str(f)) == SPLIT
    with pytest.raises(ValueError, match="device map"):
        parse_device_map("everywhere")
    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=200GiB") == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}
    assert parse_max_memory('{"0": 1000, "cpu": "1GiB"}') == {0: 1000, "cpu": "1GiB"}
    assert parse_max_memory(None) is None
    with pytest.raises(ValueError, match="max memory"):
        parse_max_memory("70GiB")


def test_the_cli_passes_the_flags_to_the_backend_and_refuses_them_elsewhere():
    from rmserve.service.cli import _backend_options, build_parser

    args = build_parser().parse_args(["serve", "--backend", "accelerate", "--device-map", "balanced",
                                      "--max-memory", "0=70GiB"])
    assert _backend_options(args) == {"device_map": "balanced", "max_memory": "0=70GiB"}
    args = build_parser().parse_args(["serve", "--device-map", "balanced"])
    with pytest.raises(ValueError, match="--backend accelerate"):
        _backend_options(args)
    args = build_parser().parse_args(["serve", "--backend", "vllm", "--tensor-parallel-size", "4"])
    assert _backend_options(args) == {"tensor_parallel_size": 4}


def test_served_through_the_grpc_server(tiny_ensemble, tiny_server, server_factory, serves_alike):
    """The split model behind the real server: every field equals the torch backend's server."""
    split = server_factory(tiny_ensemble, backend="accelerate", backend_options={"device_map": SPLIT})
    serves_alike(split.address, tiny_server.address)


def test_the_offload_folder_goes_with_its_model_not_at_exit(tiny_ensemble, tmp_path, monkeypatch):
    """Each load without --offload-folder gets its own temporary folder for its "disk" weights; a
    server swapping versions must not keep every old version's copy until it exits. The folder
    lives as long as the model, goes when it is collected, and goes at once when the load fails."""
    import gc

    from rmserve.service.engine import sharded

    made: list[Path] = []
    real = sharded._offload_folder
    monkeypatch.setattr(sharded, "_offload_folder", lambda: str(made.append(Path(real())) or made[-1]))
    model = load_sharded_model(tiny_ensemble, device_map=SPLIT)
    assert made[0].is_dir()   # (accelerate reads safetensors in place; other weights it copies here)
    engine = sharded_engine(model)
    want = engine.score(_seqs(n=3)).rewards
    gc.collect()
    assert made[0].is_dir()                                              # still in use through the engine
    assert np.array_equal(engine.score(_seqs(n=3)).rewards, want)
    del model, engine
    gc.collect()
    assert not made[0].exists()
    with pytest.raises(EnsembleFormatError):
        load_sharded_model(tmp_path, device_map=SPLIT)                   # neither an ensemble nor a checkpoint
    assert len(made) == 2 and not made[1].exists()
    mine = tmp_path / "operator-folder"
    kept = load_sharded_model(tiny_ensemble, device_map=SPLIT, offload_folder=str(mine))
    del kept
    gc.collect()
    assert mine.is_dir() and len(made) == 2                              # an operator's folder is theirs
