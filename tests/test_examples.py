"""Every runnable example in examples/ runs, on tiny settings, against a real server: none rots."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory, tiny_llama_backbone) -> Path:
    """A tiny random causal LM with the tiny backbone's tokenizer (and chat template)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("policy")
    tok = AutoTokenizer.from_pretrained(tiny_llama_backbone)
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def test_trl_grpo_example(tiny_server, tiny_policy, tmp_path, capsys):
    pytest.importorskip("trl")
    rc = load("trl_grpo").main(["--address", tiny_server.address, "--policy", str(tiny_policy), "--steps", "2",
                                "--generations", "2", "--max-completion-length", "4", "--out", str(tmp_path)])
    assert rc == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert len(lines) == 2 and all("std" in ln and "alarm" in ln for ln in lines)


@pytest.mark.skipif(not DEV.is_file(), reason="shared/data is not beside the checkout")
def test_rlaif_labeler_example(tiny_ensemble, server_factory, tmp_path):
    """The real SmolLM2 judge, against a tiny server: one comparison labelled and stored."""
    from rmserve.client import RewardClient

    server = server_factory(tiny_ensemble, labels_db=str(tmp_path / "labels.sqlite3"), runs_file="", max_tokens=512)
    example = load("rlaif_labeler")
    assert example.main(["--address", server.address, "--data", str(DEV), "--prompts", "2", "--k", "1"]) == 0
    with RewardClient(server.address, timeout=60) as c:
        (row,) = list(c.export_preferences(kind="ai"))
    assert row["judge"] == "SmolLM2-135M-Instruct" and row["labeler"] == "rlaif-smollm2"
    assert row["guideline"] == example.GUIDELINE and "judge P(a better)" in row["rationale"]
