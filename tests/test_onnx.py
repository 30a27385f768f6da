"""The onnx backend: `rmserve export-onnx` writes a graph checked against the torch path, and
`rmserve serve --backend onnx` serves it with the same results within the recorded tolerance,
on fresh inputs the check never saw: a tiny ensemble (normalisation, epistemic), members
sharing a trunk (one graph, one output per member), a seq-cls checkpoint, and the embedded default."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from rmserve.client import RewardClient
from rmserve.service.engine.backends import BACKENDS
from rmserve.service.engine.ensemble import (
    EnsembleFormatError,
    EnsembleManifest,
    MemberSpec,
    MemberTensors,
    read_manifest,
    save_member,
    write_manifest,
)
from rmserve.service.engine.model import load_model
from rmserve.service.engine.onnx_export import export_onnx, max_differences
from rmserve.service.engine.onnx_runtime import OnnxEngine, load_onnx_model
from rmserve.service.engine.scoring import ScoringEngine
from rmserve.service.server.config import BACKEND_NAMES, DEFAULT_MODEL_DIR


def fresh_seqs(seed: int, n: int, vocab: int, top: int) -> list[list[int]]:
    """Lengths the check never used, 1 included, batched with very different neighbours."""
    rng = np.random.default_rng(seed)
    lengths = [1, 2, top, *rng.integers(3, top, n - 3).tolist()]
    return [rng.integers(3, vocab, int(k)).tolist() for k in lengths]


def quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def tiny_export(tiny_ensemble, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    record = export_onnx(tiny_ensemble, out, samples=12, progress=quiet)
    return out, record


def test_backend_names_agree():
    assert set(BACKEND_NAMES) == set(BACKENDS)


def test_the_export_records_its_check_and_fresh_inputs_stay_within_it(tiny_ensemble, tiny_export):
    out, record = tiny_export
    on_disk = json.loads((out / "onnx.json").read_text())
    assert on_disk["check"] == record["check"]
    check = record["check"]
    assert check["samples"] == 12 and 0 <= check["max_abs_diff"] <= 1e-3 <= check["tolerance"] * 10
    torch_model = load_model(tiny_ensemble, dtype="float32")
    onnx_model = load_onnx_model(out)
    seqs = fresh_seqs(seed=101, n=17, vocab=onnx_model.encoder.vocab_size, top=onnx_model.max_tokens)
    want = ScoringEngine(torch_model).score(seqs)
    got = OnnxEngine(onnx_model, token_budget=256).score(seqs)
    assert np.ptp(want.rewards) > 0.1  # a real spread, not a constant both sides agree on
    diffs = max_differences(want, got)
    assert max(diffs.values()) <= check["tolerance"], diffs
    assert got.epistemic is not None and got.rewards.shape == want.rewards.shape
    # each sequence alone gives what it gave inside a padded batch
    for i in (0, 5, 16):
        alone = OnnxEngine(onnx_model).score([seqs[i]])
        np.testing.assert_allclose(alone.rewards[0], got.rewards[i], atol=check["tolerance"])


def test_onnx_scores_equal_a_float64_recomputation_from_the_files(tiny_ensemble, tiny_export):
    """Independent of both engines: plain transformers in float64, heads and normalisation by hand."""
    out, _ = tiny_export
    man = read_manifest(tiny_ensemble)
    heads = load_file(tiny_ensemble / "member0" / "heads.safetensors")
    factor = load_file(tiny_ensemble / "member0" / "uncertainty.safetensors")["factor"].double()
    bb = AutoModel.from_pretrained(tiny_ensemble / "backbone").double().eval()
    seqs = fresh_seqs(seed=7, n=6, vocab=64, top=40)
    got = OnnxEngine(load_onnx_model(out)).score(seqs)
    for i, s in enumerate(seqs):
        with torch.no_grad():
            e = bb(input_ids=torch.tensor([s])).last_hidden_state[0, -1]
        r = (e @ heads["weight"].double().T + heads["bias"].double() - torch.tensor(man.shift).double()) \
            / torch.tensor(man.scale).double()
        np.testing.assert_allclose(got.rewards[i], r.numpy(), atol=1e-4)
        assert got.var[i] == pytest.approx(r.var(unbiased=False).item(), abs=1e-4)
        assert got.epistemic[i] == pytest.approx((e @ factor).norm().item(), rel=1e-4, abs=1e-5)


def test_members_sharing_a_trunk_are_one_graph_with_an_output_each(tiny_llama4_backbone, tmp_path):
    base = load_file(tiny_llama4_backbone / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    specs = []
    for name, cut, layers in (("top", None, [3]), ("cut3", 3, [2]), ("frozen", None, [])):
        delta = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()
                 if any(k.startswith(f"layers.{i}.") for i in layers)}
        spec = MemberSpec(name=name, backbone=str(tiny_llama4_backbone), num_layers=cut)
        save_member(tmp_path / "src", spec, MemberTensors(torch.randn(2, 32, generator=g), torch.randn(2, generator=g),
                                                          delta=delta or None))
        specs.append(spec)
    write_manifest(tmp_path / "src", EnsembleManifest(name="m", version="v1", kind="members", members=specs, max_tokens=96))
    record = export_onnx(tmp_path / "src", tmp_path / "out", samples=10, progress=quiet)
    assert [m["name"] for m in record["members"]] == ["top", "cut3", "frozen"]
    exported = load_onnx_model(tmp_path / "out")
    assert len(exported.members) == 3 and len(exported.members[0].backbone.graph.outputs) == 3
    seqs = fresh_seqs(seed=3, n=9, vocab=exported.encoder.vocab_size, top=96)
    want = ScoringEngine(load_model(tmp_path / "src")).score(seqs)
    got = OnnxEngine(exported).score(seqs)
    assert got.rewards.shape == (9, 6)
    assert max(max_differences(want, got).values()) <= record["check"]["tolerance"]


def test_a_seqcls_checkpoint_exports_too(tiny_llama_seqcls, tmp_path):
    record = export_onnx(tiny_llama_seqcls, tmp_path / "out", samples=8, progress=quiet)
    seqs = fresh_seqs(seed=9, n=7, vocab=64, top=50)
    want = ScoringEngine(load_model(tiny_llama_seqcls)).score(seqs)
    got = OnnxEngine(load_onnx_model(tmp_path / "out")).score(seqs)
    assert max(max_differences(want, got).values()) <= record["check"]["tolerance"]


def test_served_with_backend_onnx_equals_the_torch_server(tiny_ensemble, tiny_export, server_factory):
    out, record = tiny_export
    samples = [{"prompt": "How do I bake bread?", "response": "Mix flour, water and yeast."},
               {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]},
               {"token_ids": [5, 9, 11]}]
    onnx_server, torch_server = server_factory(out, backend="onnx"), server_factory(tiny_ensemble)
    with RewardClient(onnx_server.address, timeout=60) as a, RewardClient(torch_server.address, timeout=60) as b:
        got, want = a.score(samples, return_members=True), b.score(samples, return_members=True)
        ia, ib = a.model_info(), b.model_info()
    tol = record["check"]["tolerance"]
    assert got.model_version == want.model_version == "v1"
    for x, y in zip(got, want, strict=True):
        for f in ("reward", "std", "min", "conservative", "epistemic"):
            assert getattr(x, f) == pytest.approx(getattr(y, f), abs=tol), f
        assert x.num_tokens == y.num_tokens
        np.testing.assert_allclose(x.members, y.members, atol=tol)
    assert (ia.name, ia.num_heads, ia.max_tokens, list(ia.shift), list(ia.scale)) == \
        (ib.name, ib.num_heads, ib.max_tokens, list(ib.shift), list(ib.scale))


def test_bad_exports_are_refused_with_the_file_named(tiny_ensemble, tiny_export, tmp_path):
    out, _ = tiny_export
    with pytest.raises(EnsembleFormatError, match=r"not an ONNX export.*export-onnx"):
        load_onnx_model(tiny_ensemble)
    with pytest.raises(ValueError, match="float32"):
        load_onnx_model(out, dtype="bfloat16")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in out.rglob("*"):
        if f.is_file():
            dest = broken / f.relative_to(out)
            dest.parent.mkdir(parents=True, exist_ok=True)
            data = f.read_bytes()
            dest.write_bytes(data[: len(data) // 2] if f.name == "model.onnx" else data)
    with pytest.raises(EnsembleFormatError, match=r"cannot load the graph .*broken/model\.onnx"):
        load_onnx_model(broken)
    with pytest.raises(FileExistsError, match="--force"):
        export_onnx(tiny_ensemble, out, progress=quiet)


def test_cli_export_refuses_a_graph_beyond_max_diff_and_writes_nothing(tiny_ensemble, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "rmserve.service.cli", "export-onnx", str(tiny_ensemble),
                          "--out", str(tmp_path / "x"), "--samples", "6", "--max-diff", "0"],
                         capture_output=True, text=True, env=env, timeout=600)
    # a float32 graph differs from torch by rounding, so a zero tolerance must refuse it
    assert run.returncode == 2 and "above --max-diff 0" in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "x").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".x.")]


def test_the_embedded_default_exports_within_tolerance(tmp_path):
    record = export_onnx(DEFAULT_MODEL_DIR, tmp_path / "default", samples=6, progress=quiet)
    assert record["check"]["max_abs_diff"] <= 1e-3
    model = load_onnx_model(tmp_path / "default")
    assert model.ood is not None and model.has_ood_score  # the default's OOD statistics travel with it
    conv = [model.encoder.prompt_response("What is the capital of France?", r).ids
            for r in ("Paris.", "I think it might be Lyon, but I am not sure at all.")]
    got = OnnxEngine(model).score(conv)
    want = ScoringEngine(load_model(DEFAULT_MODEL_DIR, dtype="float32")).score(conv)
    assert max(max_differences(want, got).values()) <= record["check"]["tolerance"]
    assert all(math.isfinite(v) for v in got.ood_score)


def test_int8_export_records_its_method_and_error_and_stays_near_float32(tiny_ensemble, tiny_export, tmp_path):
    _, fp32 = tiny_export
    record = export_onnx(tiny_ensemble, tmp_path / "int8", samples=12, quantize="int8", progress=quiet)
    assert record["quantize"]["block_size"] == 32 and "MatMulNBits" in record["quantize"]["method"]
    check = record["check"]
    # quantised weights move scores (more than float32's rounding), within the default bound
    assert fp32["check"]["max_abs_diff"] < check["max_abs_diff"] <= check["max_diff"] == pytest.approx(0.1 * check["reward_std"])
    seqs = fresh_seqs(seed=21, n=9, vocab=64, top=64)
    want = ScoringEngine(load_model(tiny_ensemble)).score(seqs)
    got = OnnxEngine(load_onnx_model(tmp_path / "int8")).score(seqs)
    assert np.abs(got.rewards - want.rewards).max() <= 0.5 * float(want.rewards.std())
    with pytest.raises(ValueError, match="quantize"):
        export_onnx(tiny_ensemble, tmp_path / "x", quantize="int4", progress=quiet)


@pytest.mark.parametrize("external", [False, True])
def test_int8_weights_replace_the_float_weights_file_and_go_external_when_large(tiny_export, tmp_path, monkeypatch,
                                                                               external):
    """A big float graph comes with its weights in model.onnx.data (torch writes them there past
    2 GB); quantising loads them, then must not leave them behind or append to them, and keeps
    the int8 weights beside the graph only when they are too large for one protobuf."""
    from rmserve.service.engine import onnx_export

    src, _ = tiny_export
    work = tmp_path / "copy"
    shutil.copytree(src, work)
    stale = work / "model.onnx.data"
    stale.write_bytes(b"\xff" * 4_000_000)                    # stands in for the float weights
    if external:
        monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_ABOVE", 0)
    onnx_export.quantize_int8(work / "model.onnx", quiet)
    if external:
        assert 0 < stale.stat().st_size < 4_000_000 and not stale.read_bytes().startswith(b"\xff" * 64)
    else:
        assert not stale.exists()
    inline = tmp_path / "inline"
    shutil.copytree(src, inline)
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_ABOVE", 1 << 40)
    onnx_export.quantize_int8(inline / "model.onnx", quiet)
    seqs = fresh_seqs(seed=22, n=7, vocab=64, top=64)
    want = OnnxEngine(load_onnx_model(inline)).score(seqs).rewards
    assert np.array_equal(OnnxEngine(load_onnx_model(work)).score(seqs).rewards, want)


def test_outputs_follow_the_manifest_order_when_members_interleave_backbones(tiny_llama4_backbone,
                                                                               tiny_llama_backbone, tmp_path):
    """Members [a on X, b on Y, c on X]: X's members share one trunk and run together, yet output i
    must be member i's embedding (what its heads read). Exporting such a mix is refused by
    torch.onnx today (a shared trunk beside another backbone): the export says so, naming it."""
    from rmserve.service.engine.onnx_export import ExportGraph

    base = load_file(tiny_llama4_backbone / "model.safetensors")
    g = torch.Generator().manual_seed(8)
    specs = []
    for name, backbone, layers in (("a", tiny_llama4_backbone, [3]), ("b", tiny_llama_backbone, []),
                                   ("c", tiny_llama4_backbone, [2, 3])):
        delta = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()
                 if any(k.startswith(f"layers.{i}.") for i in layers)}
        spec = MemberSpec(name=name, backbone=str(backbone))
        save_member(tmp_path / "src", spec, MemberTensors(torch.randn(2, 32, generator=g), torch.randn(2, generator=g),
                                                          delta=delta or None))
        specs.append(spec)
    write_manifest(tmp_path / "src", EnsembleManifest(name="mix", version="v1", kind="members", members=specs,
                                                      max_tokens=48))
    model = load_model(tmp_path / "src")
    seqs = [[5, 9, 11, 3], [7, 8]]
    engine = ScoringEngine(model)
    ids = torch.tensor([[5, 9, 11, 3], [7, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        outs = ExportGraph(model)(ids, mask)
    for i in range(3):
        torch.testing.assert_close(outs[i], engine.features(seqs, member=i), atol=1e-5, rtol=1e-5)
    with pytest.raises(EnsembleFormatError, match=r"torch\.onnx could not export"):
        export_onnx(tmp_path / "src", tmp_path / "out", samples=8, progress=quiet)
