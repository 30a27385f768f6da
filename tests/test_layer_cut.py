"""Layer cut: a backbone served with only its first N blocks.

The cut model must compute exactly what the full model's N-th block output is
after the final norm, and an ensemble naming `num_layers` must load and score
through that cut (so training on cut features and serving agree).
"""

from __future__ import annotations

import pytest
import torch

from rmserve.service.engine.backbone import load_backbone
from rmserve.service.engine.ensemble import (
    EnsembleManifest,
    MemberSpec,
    MemberTensors,
    save_member,
    write_manifest,
)
from rmserve.service.engine.model import load_model
from rmserve.service.engine.scoring import ScoringEngine


@torch.inference_mode()
def test_cut_equals_the_full_models_intermediate_layer(tiny_llama4_backbone):
    full = load_backbone(str(tiny_llama4_backbone)).model
    cut = load_backbone(str(tiny_llama4_backbone), num_layers=2)
    assert len(cut.model.layers) == 2 and cut.model.config.num_hidden_layers == 2
    assert cut.num_layers == 2 and cut.name == str(tiny_llama4_backbone)
    ids = torch.randint(1, 200, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    want = full.norm(full(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2])
    got = cut.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [0, 5])
def test_cut_out_of_range_is_refused(tiny_llama4_backbone, n):
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, 4\]"):
        load_backbone(str(tiny_llama4_backbone), num_layers=n)


def test_ensemble_with_a_layer_cut_scores_through_it(tiny_llama4_backbone, tmp_path):
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(3, 32, generator=g), torch.randn(3, generator=g)
    spec = MemberSpec(name="member0", backbone=str(tiny_llama4_backbone), num_layers=3)
    save_member(tmp_path, spec, MemberTensors(weight, bias))
    write_manifest(tmp_path, EnsembleManifest(name="cut", version="v1", kind="heads", members=[spec], max_tokens=64))
    model = load_model(tmp_path)
    assert model.backbone_layers == 3
    seqs = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [15]]
    out = ScoringEngine(model).score(seqs)
    full = load_backbone(str(tiny_llama4_backbone)).model
    with torch.inference_mode():
        for i, s in enumerate(seqs):
            hs = full(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states[3]
            e = full.norm(hs)[0, -1]
            torch.testing.assert_close(torch.from_numpy(out.rewards[i]), e @ weight.T + bias, rtol=1e-4, atol=1e-4)
