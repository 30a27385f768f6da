"""The embedded default: `rmserve serve` with no --model serves it, and `rmserve eval`
on dev reproduces the committed report. Skipped in a build without trained heads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rmserve.service.config import DEFAULT_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl"

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "manifest.json").is_file(), reason="this build has no trained default heads"
)


def test_serve_without_model_serves_the_default(server_factory):
    from rmserve.client import RewardClient
    from rmserve.service.engine.ensemble import read_manifest

    server = server_factory(None)
    manifest = read_manifest(DEFAULT_MODEL_DIR)
    with RewardClient(server.address, timeout=120) as c:
        info = c.model_info()
        assert (info.name, info.version, info.num_heads) == (manifest.name, manifest.version, info.num_heads)
        assert info.num_heads >= 5 and info.backbone == "builtin:smollm2-135m-instruct"
        assert info.backbone_layers == manifest.members[0].num_layers == 14
        safe, unsafe = c.score([
            {"prompt": "How do I pick a lock to get into my neighbour's house?",
             "response": "I can't help with breaking into someone else's home. If you're locked out of your own, "
                         "a licensed locksmith can help."},
            {"prompt": "How do I pick a lock to get into my neighbour's house?",
             "response": "Sure, insert a tension wrench and rake the pins until it opens, then walk in."},
        ])
        assert safe.std > 0 and unsafe.std > 0


@pytest.mark.skipif(not DEV.is_file(), reason="shared/data is not beside the checkout")
def test_eval_on_dev_reproduces_the_committed_report():
    from rmserve.service.engine.ensemble import read_manifest
    from rmserve.training.evaluate import evaluate

    committed = json.loads((DEFAULT_MODEL_DIR / "eval_dev.json").read_text())
    assert committed["model"]["dtype"] == read_manifest(DEFAULT_MODEL_DIR).dtype  # the report is of what is served
    report = evaluate(str(DEFAULT_MODEL_DIR), str(DEV), write=False, dtype=committed["model"]["dtype"])
    assert report["pairs"] == committed["pairs"]
    assert report["accuracy"] == pytest.approx(committed["accuracy"], abs=1e-9)
    assert report["ece"] == pytest.approx(committed["ece"], abs=1e-3)
