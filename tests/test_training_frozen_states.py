"""The frozen-layer cache: training on cached states must equal full forwards, LoRA included."""

from __future__ import annotations

import pytest
import torch

from rmserve.service.engine.backbone import load_backbone
from rmserve.training import frozen_states
from rmserve.training.tuning import embed, make_trainable

SEQS = [[5, 9, 13, 40, 41, 7], [3, 4], [10, 11, 12, 13, 14, 15, 16, 17, 18], [60, 61, 62]]


@pytest.fixture
def model(tiny_llama_backbone):
    return load_backbone(str(tiny_llama_backbone)).model


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_cached_prefix_path_equals_the_full_forward(model, lora_rank):
    cpu = torch.device("cpu")
    states = frozen_states.compute(model, SEQS, 1, pad_id=0, token_budget=12)  # several batches
    assert states.states.shape == (sum(len(s) for s in SEQS), 32)
    tuned = make_trainable(model, layers=1, lora_rank=lora_rank, seed=0)
    with torch.no_grad():  # move off the identity so LoRA actually contributes
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    full = embed(tuned.model, SEQS, pad_id=0, pooling="last", device=cpu)
    via = frozen_states.embed_from(tuned.model, states, [0, 1, 2, 3], pooling="last", device=cpu)
    assert torch.allclose(full, via, atol=1e-5)
    # gradients flow into the trained layer only through the cached path
    via.sum().backward()
    assert all(p.grad is not None for p in tuned.parameters())
    assert frozen_states.check(tuned.model, states, SEQS, [0, 2], pad_id=0) is None
    assert len(list(model.layers)) == 2 and not isinstance(model.layers[0], frozen_states._Passthrough)


def test_a_model_the_cached_path_cannot_reproduce_is_detected(model):
    states = frozen_states.compute(model, SEQS, 1, pad_id=0)
    states.states.mul_(3.0)  # what a model that rescales inputs_embeds would look like
    assert "differs from the full forward" in frozen_states.check(model, states, SEQS, [0, 1], pad_id=0)


def test_training_falls_back_to_full_forwards_when_the_check_fails(tmp_path, tiny_llama_backbone, monkeypatch):
    import json

    from rmserve.service.data.train_config import TrainConfig
    from rmserve.training.trainer import train

    rows = [{"prompt": "q", "chosen": f"fox {w} thanks", "rejected": f"fox {w} no"} for w in ("dog", "salt", "bread", "quick")]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(frozen_states, "check", lambda *a, **k: "not supported here")
    rep = train(TrainConfig(data=str(data), out=str(tmp_path / "rm"), backbone=str(tiny_llama_backbone),
                            finetune_layers=1, num_heads=2, epochs=1, batch_size=2, max_tokens=64,
                            feature_cache="")).report
    assert rep["features"]["problem"] == "not supported here" and rep["train"]["pairs"] == 4
