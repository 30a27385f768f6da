"""Shared fixtures: tiny random-weight models saved as real checkpoint directories.

Nothing is fetched from a hub: the tokenizer is a byte-level BPE trained here on
a few sentences, the models are random Llama/BERT configs. They load through the
same code path as any user model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `python -m pytest` puts the working directory first on sys.path, and from the repository root
# its `kernels/` folder would shadow Hugging Face's `kernels` package, which transformers imports
# when installed (rmserve's kernels are `rmserve.kernels`). Move it last: the `tests` package, which
# spawned children import, stays reachable (they inherit this sys.path). Children started with
# `python -m` get PYTHONSAFEPATH=1 for the same reason; `python bench/<script>.py` children need
# their script's folder on sys.path, which PYTHONSAFEPATH drops: their tests run them without it.
_ROOT = Path(__file__).resolve().parent.parent
_rest = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
sys.path[:] = [*_rest, str(_ROOT)]
os.environ["PYTHONSAFEPATH"] = "1"

import pytest  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I bake bread? Mix flour, water, salt and yeast, then knead.",
    "I cannot help with that request, but here is something safer.",
    "Human: hello there Assistant: hi, how can I help you today?",
    "Numbers 0123456789 and punctuation !?.,;:'\"()[]{}<>-_/\\|@#$%^&*+=~`",
]


def make_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def llama_config(vocab_size: int, **kw):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return LlamaConfig(**base)


def make_tiny_llama_backbone(out: Path, seed: int = 0, **config) -> Path:
    """A bare LlamaModel checkpoint + tokenizer: what an ensemble member points at."""
    import torch
    from transformers import LlamaModel

    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    LlamaModel(llama_config(len(tok), **config)).save_pretrained(out)
    return out


def make_tiny_llama_seqcls(out: Path, seed: int = 1) -> Path:
    import torch
    from transformers import LlamaForSequenceClassification

    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(llama_config(len(tok), num_labels=1))
    model.score.weight.data.normal_(0, 1.0)
    model.save_pretrained(out)
    return out


def make_tiny_bert_seqcls(out: Path, seed: int = 2) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512, num_labels=1, pad_token_id=0,
    )
    BertForSequenceClassification(cfg).save_pretrained(out)
    return out


def make_tiny_ensemble(out: Path, *, num_heads: int = 4, with_epistemic: bool = True, seed: int = 3) -> Path:
    """A 'heads' ensemble over a tiny Llama backbone with random (but fixed) heads."""
    import torch

    from rmserve.service.engine.ensemble import (
        EnsembleManifest,
        MemberSpec,
        MemberTensors,
        save_member,
        write_manifest,
    )

    make_tiny_llama_backbone(out / "backbone")
    g = torch.Generator().manual_seed(seed)
    h = 32
    tensors = MemberTensors(
        weight=torch.randn(num_heads, h, generator=g),
        bias=torch.randn(num_heads, generator=g),
        unc_factor=torch.randn(h, h, generator=g) / h if with_epistemic else None,
    )
    spec = MemberSpec(name="member0", backbone="backbone")
    save_member(out, spec, tensors)
    manifest = EnsembleManifest(
        name="tiny-test", version="v1", kind="heads", members=[spec],
        shift=[0.5] * num_heads, scale=[2.0] * num_heads, uncertainty_penalty=0.5, max_tokens=64,
    )
    write_manifest(out, manifest)
    return out


@pytest.fixture(scope="session")
def tiny_llama_backbone(tmp_path_factory) -> Path:
    return make_tiny_llama_backbone(tmp_path_factory.mktemp("llama_backbone"))


@pytest.fixture(scope="session")
def tiny_llama4_backbone(tmp_path_factory) -> Path:
    """Four layers, for layer cuts."""
    return make_tiny_llama_backbone(tmp_path_factory.mktemp("llama4_backbone"), seed=7, num_hidden_layers=4)


@pytest.fixture(scope="session")
def tiny_llama_seqcls(tmp_path_factory) -> Path:
    return make_tiny_llama_seqcls(tmp_path_factory.mktemp("llama_seqcls"))


@pytest.fixture(scope="session")
def tiny_bert_seqcls(tmp_path_factory) -> Path:
    return make_tiny_bert_seqcls(tmp_path_factory.mktemp("bert_seqcls"))


@pytest.fixture(scope="session")
def smollm2_ensemble(tmp_path_factory) -> Path:
    """The embedded default's backbone (SmolLM2-135M, fetched and converted once) with 3 random heads."""
    import torch

    from rmserve.service.engine.ensemble import (
        EnsembleManifest,
        MemberSpec,
        MemberTensors,
        save_member,
        write_manifest,
    )

    out = tmp_path_factory.mktemp("smollm2_ensemble")
    spec = MemberSpec(name="member0", backbone="builtin:smollm2-135m-instruct")
    g = torch.Generator().manual_seed(0)
    save_member(out, spec, MemberTensors(weight=torch.randn(3, 576, generator=g) / 24, bias=torch.zeros(3)))
    write_manifest(out, EnsembleManifest(name="t", version="t", kind="heads", members=[spec], max_tokens=512))
    return out


@pytest.fixture(scope="session")
def tiny_ensemble(tmp_path_factory) -> Path:
    return make_tiny_ensemble(tmp_path_factory.mktemp("ensemble"))


def start_server(model: Path | str, wait_ready: bool = True, **config):
    import tempfile

    from rmserve.service.server.background import BackgroundServer
    from rmserve.service.server.config import ServerConfig

    config.setdefault("registry", tempfile.mkdtemp(prefix="rmserve-registry-"))
    return BackgroundServer(ServerConfig(model=None if model is None else str(model), port=0, metrics_port=0, **config)).start(wait_ready)


@pytest.fixture(scope="session")
def tiny_server(tiny_ensemble):
    s = start_server(tiny_ensemble, max_samples_per_request=16, max_message_bytes=1 << 20)
    yield s
    s.stop()


@pytest.fixture
def serve_process():
    """Start `rmserve serve` child processes, all killed after the test:
    start(model, cwd, *flags) -> (process, address, metrics port or None) once SERVING."""
    import re
    import subprocess
    import threading

    started: list[subprocess.Popen] = []

    def start(model, cwd: Path, *extra: str):
        proc = subprocess.Popen(
            [sys.executable, "-m", "rmserve.service.cli", "serve", "--model", str(model), "--port", "0",
             "--registry", str(cwd / "registry"), *extra],
            stderr=subprocess.PIPE, text=True, cwd=cwd,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
        )
        started.append(proc)
        log = []
        while line := proc.stderr.readline():
            log.append(line)
            if m := re.search(r"SERVING .* on 127\.0\.0\.1:(\d+), metrics on (\w+)", line):
                threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
                return proc, f"127.0.0.1:{m.group(1)}", None if m.group(2) == "off" else int(m.group(2))
        raise AssertionError("no SERVING line:\n" + "".join(log))

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(30)


# One sample of each kind a trainer sends: prompt + response, a conversation, token ids.
SERVED_SAMPLES = [{"prompt": "How do I bake bread?", "response": "Mix flour, water, salt and yeast."},
                  {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi!"}]},
                  {"token_ids": [5, 9, 17, 33, 2]}]


@pytest.fixture
def serves_alike():
    """check(address, reference) -> (got, want): SERVED_SAMPLES scored by two servers (another
    backend, and the torch backend's), every field and head equal within 1e-5."""
    import numpy as np

    from rmserve.client import RewardClient

    def check(address: str, reference: str):
        with RewardClient(address) as c, RewardClient(reference) as ref:
            got = c.score(SERVED_SAMPLES, uncertainty_penalty=0.5, return_members=True)
            want = ref.score(SERVED_SAMPLES, uncertainty_penalty=0.5, return_members=True)
        for g, w in zip(got, want, strict=True):
            for name in ("reward", "std", "min", "conservative", "epistemic", "num_tokens"):
                assert getattr(g, name) == pytest.approx(getattr(w, name), rel=1e-5, abs=1e-5), name
            np.testing.assert_allclose(g.members, w.members, rtol=1e-5, atol=1e-5)
        return got, want

    return check


@pytest.fixture
def server_factory():
    """Start extra servers with their own config; all are stopped after the test."""
    started = []

    def make(model, wait_ready: bool = True, **config):
        s = start_server(model, wait_ready, **config)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()
