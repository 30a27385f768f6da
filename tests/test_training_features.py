"""The per-sequence feature cache (training/features.py): only new sequences are computed."""

from __future__ import annotations

import torch

from rmserve.service.engine.backbone import load_backbone
from rmserve.service.engine.tokenization import PromptEncoder
from rmserve.training.features import (
    FeatureCache,
    cached_features,
    compute_features,
    feature_engine,
)


def test_a_new_file_computes_only_its_new_sequences(tiny_llama_backbone, tmp_path):
    bb = load_backbone(str(tiny_llama_backbone))
    enc = PromptEncoder(bb.tokenizer, 64)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 200, (int(n),), generator=g).tolist() for n in torch.randint(2, 30, (12,), generator=g)]
    want = compute_features(feature_engine(bb, enc, 4096), seqs)
    computed: list[int] = []

    def run(batch):
        computed.clear()
        return cached_features(bb, enc, batch, cache_dir=tmp_path,
                               progress=lambda done, total: computed.append(total))

    first, key, hit = run(seqs[:8])
    assert not hit and computed[-1] == 8
    torch.testing.assert_close(first, want[:8], rtol=0, atol=1e-5)
    # the second file shares 4 sequences with the first (and repeats one): 4 new ones are computed
    second_seqs = [*seqs[4:], seqs[5]]
    second, key2, hit = run(second_seqs)
    assert key2 == key and not hit and computed[-1] == 4
    torch.testing.assert_close(second, want[[*range(4, 12), 5]], rtol=0, atol=1e-5)
    again, _, hit = run(list(reversed(seqs)))
    assert hit and computed == []
    torch.testing.assert_close(again, want.flip(0), rtol=0, atol=1e-5)
    assert len(list(FeatureCache(tmp_path, bb).dir.glob("shard-*.safetensors"))) == 2


def test_an_unreadable_shard_is_recomputed_not_trusted(tiny_llama_backbone, tmp_path):
    bb = load_backbone(str(tiny_llama_backbone))
    enc = PromptEncoder(bb.tokenizer, 64)
    seqs = [[5, 6, 7], [8, 9, 10, 11]]
    feats, _, _ = cached_features(bb, enc, seqs, cache_dir=tmp_path)
    (shard,) = FeatureCache(tmp_path, bb).dir.glob("shard-*.safetensors")
    shard.write_bytes(b"not a safetensors file")
    again, _, hit = cached_features(bb, enc, seqs, cache_dir=tmp_path)
    assert not hit
    torch.testing.assert_close(again, feats, rtol=0, atol=1e-5)
