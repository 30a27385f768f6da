"""What the test modules share: tiny random-weight models saved as real checkpoint directories,
an in-process server, readers of Prometheus metrics, a self-signed certificate, a child's log.

Nothing is fetched from a hub: the tokenizer is a byte-level BPE trained here on a few sentences,
the models are random Llama/BERT configs. They load through the same code path as any user model.

Test modules and conftest.py import this as `tests.helpers`: pytest's importlib mode names every
module from the rootdir, so no sys.path entry is needed under `pytest` or `python -m pytest`.
The fixtures built on these helpers live in conftest.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from rmserve.service.server.background import BackgroundServer

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

# One sample of each kind a trainer sends: prompt + response, a conversation, token ids.
SERVED_SAMPLES = [{"prompt": "How do I bake bread?", "response": "Mix flour, water, salt and yeast."},
                  {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi!"}]},
                  {"token_ids": [5, 9, 17, 33, 2]}]

# The fields of an engine's batch result that every backend must fill alike.
SCORE_FIELDS = ("rewards", "mean", "var", "min", "epistemic", "ood_score")


# ------------------------------------------------------------------------------ tiny models


def byte_bpe_tokenizer(corpus: list[str], specials: list[str], vocab_size: int = 300):
    """A byte-level BPE trained on `corpus`, with the chat template every tiny model uses."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tokenizer(out: Path):
    """The tiny models' tokenizer (300 tokens), saved to `out`."""
    specials = ["<pad>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
    fast = byte_bpe_tokenizer(CORPUS, specials)
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


def assert_same_scores(got, want, atol: float = 1e-5) -> None:
    """Two engines' batch results agree on every field (both absent, or equal within tolerance)."""
    for name in SCORE_FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol, err_msg=name)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the Linux kernel lists them (/proc/cpuinfo); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith(("flags", "Features")) for f in line.split(":", 1)[1].split()}


# ------------------------------------------------------------------------------ servers


def start_server(model: Path | str | None, wait_ready: bool = True, **config) -> BackgroundServer:
    """An in-process server on free ports with a registry of its own; the caller stops it."""
    from rmserve.service.server.background import BackgroundServer
    from rmserve.service.server.config import ServerConfig

    config.setdefault("registry", tempfile.mkdtemp(prefix="rmserve-registry-"))
    return BackgroundServer(ServerConfig(model=None if model is None else str(model), port=0, metrics_port=0, **config)).start(wait_ready)


def wait_for_line(proc: subprocess.Popen, pattern: str, log: list[str], timeout: float = 120) -> re.Match:
    """Read a child's stderr (text mode) until a line matches `pattern`; every line read is kept
    in `log`, which the failure shows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        log.append(line)
        if m := re.search(pattern, line):
            return m
    raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(log))


def self_signed_cert(directory: Path, subject: str, alt_names: str) -> tuple[Path, Path]:
    """(cert.pem, key.pem): a one-day EC certificate from the openssl CLI; skips without openssl.
    `subject` like "/CN=localhost", `alt_names` like "IP:127.0.0.1,DNS:localhost"."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not installed")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", subject,
         "-addext", f"subjectAltName={alt_names}"],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


# ------------------------------------------------------------------------------ metrics
# Read through prometheus-client's public API (a registry's samples, or the text exposition a
# scraper sees), never through a metric object's private fields.


def registry_sample(registry: CollectorRegistry, name: str, /, **labels: str) -> float:
    """One sample of an in-process registry (a server's own: `server.state.metrics.registry`) by its
    exposition name (`rmserve_requests_total`, `rmserve_forward_seconds_count`); 0 when not yet
    written (a labelled child nobody has counted)."""
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def scrape(url: str) -> list[Any]:
    """Every sample a scrape of `url` (a /metrics endpoint) returns, parsed."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def scraped_sample(url: str, name: str, /, **labels: str) -> float:
    """One sample of a /metrics endpoint by its exposition name and exact labels; 0 when absent."""
    for s in scrape(url):
        if s.name == name and s.labels == labels:
            return s.value
    return 0.0
