"""`--backend vllm` (service/engine/vllm_backend.py): the request/response mapping against a fake
vLLM engine.

vLLM needs a GPU and pins its own CUDA stack, so it is not installed here. The fake has the
methods and return shapes of vLLM 0.34.0's offline API (read in its source:
vllm/entrypoints/pooling/offline.py `encode`, vllm/outputs.py `PoolingRequestOutput`,
`PoolingOutput`, `RequestError`), and computes what the pooling runner would: the last token's
final hidden state with no activation (`convert="embed"`, `PoolerConfig(seq_pooling_type="LAST",
use_activation=False)`) or the seq-cls head's raw logit (`convert="classify"`), with plain
transformers from the directory vLLM was told to load. So the scores must equal the torch
backend's, and every field rmserve adds (std, min, epistemic, OOD) comes from rmserve's heads
on vLLM's vectors.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification

from rmserve.service.engine import vllm_backend
from rmserve.service.engine.ensemble import (
    EnsembleFormatError,
    EnsembleManifest,
    MemberSpec,
    MemberTensors,
    save_member,
    write_manifest,
)
from rmserve.service.engine.errors import InvalidInput
from rmserve.service.engine.model import load_model
from rmserve.service.engine.ood import OodStats
from rmserve.service.engine.scoring import ScoringEngine
from rmserve.service.engine.vllm_backend import (
    VllmEngine,
    VllmRequestFailed,
    VllmUnavailable,
    cut_checkpoint,
    load_vllm_model,
)
from tests.helpers import assert_same_scores as _assert_same

H = 32


# ---------------------------------------------------------------- vLLM 0.34.0's shapes


@dataclass
class RequestError:            # vllm/outputs.py
    code: str
    message: str
    retryable: bool = False


@dataclass
class PoolingOutput:           # vllm/outputs.py: `data` is a torch tensor ([H] for embed, [labels] for classify)
    data: torch.Tensor


class PoolingRequestOutput:    # vllm/outputs.py
    def __init__(self, request_id, outputs, prompt_token_ids, num_cached_tokens, finished, *, error=None):
        self.request_id, self.outputs, self.prompt_token_ids = request_id, outputs, prompt_token_ids
        self.num_cached_tokens, self.finished, self.error = num_cached_tokens, finished, error


class FakeLLM:
    """vllm.LLM(model, runner="pooling", convert=..., pooler_config=...) for one checkpoint."""

    def __init__(self, **kw):
        self.kw = kw
        self.calls: list[int] = []
        self.refuse: dict[int, RequestError] = {}   # token id -> the error a prompt holding it gets
        self.raise_on: int | None = None            # token id whose presence fails the whole call
        if kw["convert"] == "classify":
            self.model = AutoModelForSequenceClassification.from_pretrained(kw["model"], dtype=torch.float32).eval()
        else:
            self.model = AutoModel.from_pretrained(kw["model"], dtype=torch.float32).eval()

    # the signature of vllm.entrypoints.pooling.offline.PoolingOfflineMixin.encode
    def encode(self, prompts, pooling_params=None, *, use_tqdm=True, lora_request=None, pooling_task=None,
               tokenization_kwargs=None):
        assert pooling_task == self.kw["convert"], "encode's pooling_task must be the model's task"
        self.calls.append(len(prompts))
        out = []
        for i, p in enumerate(prompts):
            ids = p["prompt_token_ids"]
            if self.raise_on is not None and self.raise_on in ids:
                raise RuntimeError("EngineCore died")
            err = next((e for t, e in self.refuse.items() if t in ids), None)
            if err is not None:
                out.append(PoolingRequestOutput(str(i), PoolingOutput(torch.empty(0)), ids, 0, True, error=err))
                continue
            with torch.no_grad():
                x = torch.tensor([ids])
                if self.kw["convert"] == "classify":
                    data = self.model(input_ids=x).logits[0]          # raw logit: use_activation=False
                else:
                    data = self.model(input_ids=x).last_hidden_state[0, -1]  # LAST pooling, not normalised
            out.append(PoolingRequestOutput(str(i), PoolingOutput(data.float()), ids, 0, True))
        return out


class Factory:
    def __init__(self):
        self.made: list[FakeLLM] = []

    def __call__(self, **kw):
        llm = FakeLLM(**kw)
        self.made.append(llm)
        return llm


# --------------------------------------------------------------------------------- helpers


def _seqs(n: int = 13, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(5, 250, int(rng.integers(1, 40))).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def heads_ensemble(tiny_llama4_backbone, tmp_path_factory):
    """Two heads members on one 4-layer backbone cut at 3 (what vLLM can serve), with epistemic
    factors, OOD statistics and a calibration: every field rmserve adds."""
    out = tmp_path_factory.mktemp("vllm_heads")
    g = torch.Generator().manual_seed(21)
    specs = []
    for name, k in (("a", 3), ("b", 2)):
        spec = MemberSpec(name=name, backbone=str(tiny_llama4_backbone), num_layers=3)
        save_member(out, spec, MemberTensors(
            weight=torch.randn(k, H, generator=g), bias=torch.randn(k, generator=g) + (2.0 if name == "b" else 0.0),
            unc_factor=torch.randn(H, H, generator=g) / H,
            ood=OodStats(torch.randn(H, generator=g) * 0.1, torch.eye(H) + 0.01 * torch.randn(H, H, generator=g))))
        specs.append(spec)
    write_manifest(out, EnsembleManifest(
        name="heads2", version="v1", kind="heads", members=specs, max_tokens=64, shift=[0.1] * 5, scale=[1.5] * 5,
        ood={"threshold": 1.5, "quantile": 0.98, "calibrated_on": "test"}))
    return out


# ----------------------------------------------------------------------------------- tests


def test_an_ensemble_runs_on_the_pooling_runner_with_rmserves_heads(heads_ensemble, tmp_path, monkeypatch):
    monkeypatch.setenv("RMSERVE_CACHE", str(tmp_path))
    factory = Factory()
    model = load_vllm_model(heads_ensemble, dtype="float32", tensor_parallel_size=2, gpu_memory_utilization=0.8,
                            llm_factory=factory)
    (llm,) = factory.made
    kw = dict(llm.kw)
    assert kw.pop("model") != str(heads_ensemble)  # the cut checkpoint (next test)
    assert kw == {"runner": "pooling", "convert": "embed",
                  "pooler_config": {"seq_pooling_type": "LAST", "use_activation": False},
                  "dtype": "float32", "max_model_len": 64, "tensor_parallel_size": 2, "gpu_memory_utilization": 0.8}
    assert model.backbone_layers == 3 and model.num_heads == 5 and model.ood is not None
    seqs = _seqs()
    got = VllmEngine(model).score(seqs)
    assert llm.calls == [len(seqs)]  # one encode per scheduler batch: vLLM batches it
    want = ScoringEngine(load_model(heads_ensemble, dtype="float32")).score(seqs)
    _assert_same(got, want)
    assert got.stats.real_tokens == sum(map(len, seqs)) and got.stats.batches == 1


def test_a_layer_cut_is_served_from_a_checkpoint_holding_only_its_layers(tiny_llama4_backbone, tmp_path):
    cut = cut_checkpoint(tiny_llama4_backbone, 2, root=tmp_path)
    with safe_open(cut / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert {n.split(".")[1] for n in names if n.startswith("layers.")} == {"0", "1"}
    assert "embed_tokens.weight" in names and "norm.weight" in names
    assert (cut / "tokenizer.json").is_file()
    assert cut_checkpoint(tiny_llama4_backbone, 2, root=tmp_path) == cut  # written once
    assert cut_checkpoint(tiny_llama4_backbone, 4, root=tmp_path) == tiny_llama4_backbone  # nothing to cut
    full = load_file(tiny_llama4_backbone / "model.safetensors")
    for n in names:
        torch.testing.assert_close(load_file(cut / "model.safetensors")[n], full[n], rtol=0, atol=0)
    with pytest.raises(EnsembleFormatError, match="num_layers"):
        cut_checkpoint(tiny_llama4_backbone, 5, root=tmp_path)


def test_a_seqcls_checkpoint_maps_to_classify(tiny_llama_seqcls):
    factory = Factory()
    model = load_vllm_model(tiny_llama_seqcls, dtype="float32", llm_factory=factory)
    assert factory.made[0].kw["convert"] == "classify" and factory.made[0].kw["model"] == str(tiny_llama_seqcls)
    seqs = _seqs(seed=1)
    _assert_same(VllmEngine(model).score(seqs), ScoringEngine(load_model(tiny_llama_seqcls, dtype="float32")).score(seqs))


def test_request_errors_map_to_clear_exceptions(tiny_ensemble):
    factory = Factory()
    engine = VllmEngine(load_vllm_model(tiny_ensemble, dtype="float32", llm_factory=factory))
    llm = factory.made[0]
    llm.refuse = {7: RequestError("validation_error", "prompt too long"), 8: RequestError("internal", "boom", True)}
    llm.raise_on = 9
    with pytest.raises(InvalidInput, match=r"sequence 1 of 2 \(3 tokens\): validation_error: prompt too long"):
        engine.score([[5, 6], [5, 7, 6]])
    with pytest.raises(VllmRequestFailed, match=r"internal: boom \(retryable\)") as retryable:
        engine.score([[5, 8]])
    from rmserve.service.server.errors import grpc_status

    # what vLLM marks retryable reaches the caller as UNAVAILABLE (the SDK retries it); the rest is INTERNAL
    assert grpc_status(retryable.value)[0].name == "UNAVAILABLE"
    llm.refuse[8] = RequestError("internal", "boom", False)
    with pytest.raises(VllmRequestFailed) as final:
        engine.score([[5, 8]])
    assert grpc_status(final.value)[0].name == "INTERNAL"
    with pytest.raises(VllmRequestFailed, match="failed a batch of 2 sequences: RuntimeError: EngineCore died"):
        engine.score([[5, 6], [9]])
    real = llm.encode
    llm.encode = lambda prompts, **kw: real(prompts, **kw)[:-1]
    with pytest.raises(VllmRequestFailed, match="answered 1 of 2"):
        engine.score([[5, 6], [6, 5]])
    llm.encode = lambda prompts, **kw: [PoolingRequestOutput("0", PoolingOutput(torch.ones(H + 1)), p["prompt_token_ids"],
                                                             0, True) for p in prompts]
    with pytest.raises(VllmRequestFailed, match=f"size {H + 1}; the heads read {H}"):
        engine.score([[5, 6]])
    llm.encode = real
    assert engine.score([[5, 6]]).rewards.shape == (1, 4)  # and it still serves


def test_what_vllm_cannot_serve_is_refused(tiny_llama_backbone, tiny_llama4_backbone, tmp_path):
    g = torch.Generator().manual_seed(0)
    layer = "layers.1.mlp.down_proj.weight"
    base = load_file(tiny_llama_backbone / "model.safetensors")[layer]
    spec = MemberSpec(name="tuned", backbone=str(tiny_llama_backbone))
    save_member(tmp_path / "d", spec, MemberTensors(weight=torch.randn(2, H, generator=g), bias=torch.zeros(2),
                                                    delta={layer: base + 0.1}))
    write_manifest(tmp_path / "d", EnsembleManifest(name="d", version="v1", kind="members", members=[spec]))
    with pytest.raises(EnsembleFormatError, match="trained backbone tensors"):
        load_vllm_model(tmp_path / "d", llm_factory=Factory())
    specs = [MemberSpec(name="a", backbone=str(tiny_llama_backbone)), MemberSpec(name="b", backbone=str(tiny_llama4_backbone))]
    for s in specs:
        save_member(tmp_path / "two", s, MemberTensors(weight=torch.randn(2, H, generator=g), bias=torch.zeros(2)))
    write_manifest(tmp_path / "two", EnsembleManifest(name="two", version="v1", kind="members", members=specs))
    with pytest.raises(EnsembleFormatError, match="members on one backbone"):
        load_vllm_model(tmp_path / "two", llm_factory=Factory())


def test_a_hot_swap_on_the_same_backbone_reuses_the_running_engine(tiny_ensemble):
    made = []

    def factory(**kw):  # counts, and keeps no engine alive itself
        made.append(kw["model"])
        return FakeLLM(**kw)

    first = load_vllm_model(tiny_ensemble, dtype="float32", llm_factory=factory)
    second = load_vllm_model(tiny_ensemble, dtype="float32", llm_factory=factory)
    assert len(made) == 1
    assert first.members[0].backbone.llm is second.members[0].backbone.llm
    del first, second
    gc.collect()
    load_vllm_model(tiny_ensemble, dtype="float32", llm_factory=factory)  # nobody held it: a new one
    assert len(made) == 2


def test_without_vllm_the_error_says_how_to_install_it(tiny_ensemble):
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed here")
    with pytest.raises(VllmUnavailable, match="pip install"):
        load_vllm_model(tiny_ensemble)


def test_served_through_the_grpc_server(tiny_ensemble, tiny_server, server_factory, serves_alike):
    """The fake vLLM behind the real server (scheduler, auth-free localhost, metrics): every field
    equals the torch backend's server; a sample vLLM refuses as invalid is an INVALID_ARGUMENT
    for that sample alone."""
    from rmserve.client import InvalidRequestError, RewardClient

    factory = Factory()
    server = server_factory(tiny_ensemble, backend="vllm", backend_options={"llm_factory": factory})
    got, _ = serves_alike(server.address, tiny_server.address)
    with RewardClient(server.address) as c:
        factory.made[0].refuse = {250: RequestError("validation_error", "token 250 is not allowed")}
        with pytest.raises(InvalidRequestError, match="token 250 is not allowed"):
            c.score([{"token_ids": [5, 250, 6]}])
        assert c.score([{"token_ids": [5, 9, 17, 33, 2]}])[0].reward == pytest.approx(got[2].reward, abs=1e-6)
    assert vllm_backend.POOLER == {"seq_pooling_type": "LAST", "use_activation": False}
