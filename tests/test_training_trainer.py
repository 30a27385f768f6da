"""End-to-end training on a tiny random-weight Llama with a known preference rule.

The rule: the chosen response says "thanks" where the rejected one says "no"
(same prompt, same other words, marker at a random position). A frozen random
backbone mixes the marker's embedding into the last-token state, so it is
linearly decodable: heads on frozen features, fine-tuned layers and LoRA
members must all reach near-perfect accuracy, on train and on fresh pairs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rmserve.service.data.train_config import TrainConfig
from rmserve.service.engine.backbone import load_backbone
from rmserve.service.engine.ensemble import read_manifest
from rmserve.service.engine.model import load_model
from rmserve.service.engine.scoring import ScoringEngine
from rmserve.training.data import load_pairs
from rmserve.training.encoding import encode_pairs
from rmserve.training.evaluate import evaluate
from rmserve.training.trainer import TrainingStopped, train

WORDS = ["fox", "dog", "bread", "flour", "water", "salt", "yeast", "knead", "quick", "brown", "lazy", "help", "safer", "hello", "there", "today"]


def synthetic_rows(n: int, seed: int, flip: float = 0.0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        body = [rng.choice(WORDS) for _ in range(rng.randint(1, 4))]
        pos = rng.randint(0, len(body))
        good = " ".join([*body[:pos], "thanks", *body[pos:]])
        bad = " ".join([*body[:pos], "no", *body[pos:]])
        if rng.random() < flip:
            good, bad = bad, good
        rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("synth")
    return {
        "train": write_jsonl(d / "train.jsonl", synthetic_rows(96, seed=1)),
        "small": write_jsonl(d / "small.jsonl", synthetic_rows(48, seed=4)),
        "test": write_jsonl(d / "test.jsonl", synthetic_rows(48, seed=2)),
        "noisy": write_jsonl(d / "noisy.jsonl", synthetic_rows(160, seed=3, flip=0.25)),
    }


def config(tmp_path: Path, backbone: Path, data: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(data), out=str(tmp_path / "rm"), backbone=str(backbone), max_tokens=128, batch_size=16,
        lr=1e-2, backbone_lr=2e-3, epochs=3, calib_frac=0.0, feature_cache=str(tmp_path / "cache"),
    )
    return TrainConfig(**{**base, **kw})


def test_frozen_heads_learn_the_rule_and_the_served_directory_reproduces_the_report(
    tmp_path, tiny_llama_backbone, synth
):
    events = []
    cfg = config(tmp_path, tiny_llama_backbone, synth["train"], kind="heads", num_heads=3, epochs=8, dev=str(synth["test"]))
    result = train(cfg, progress=events.append)
    rep = result.report
    assert rep["train"]["accuracy"] >= 0.97 and rep["dev"]["accuracy"] >= 0.95
    assert rep["features"]["cache_hit"] is False and rep["features"]["sequences"] == 192
    for split, n in ((rep["train"], 96), (rep["dev"], 48)):  # every pair falls in one length group
        assert sum(g["n"] for g in split["length_split"].values()) == n and "length_balanced_accuracy" in split

    # the directory loads like any served model, and the engine reproduces the trainer's numbers
    served = evaluate(result.out, synth["train"], write=False)
    for key in ("accuracy", "ece", "brier", "nll", "reward_mean", "reward_std", "auroc_std", "auroc_epistemic"):
        assert served[key] == pytest.approx(rep["train"][key], abs=1e-4), key
    assert served["accuracy_per_head"] == rep["train"]["accuracy_per_head"]
    assert (result.out / "eval_test.json").is_file() and (result.out / "train_report.json").is_file()

    # normalisation: every served head has mean 0, std 1 over the training sequences
    model = load_model(result.out)
    pairs, report = load_pairs(synth["train"])
    seqs = encode_pairs(pairs, model.encoder, report).seqs
    out = ScoringEngine(model).score(seqs)
    assert np.allclose(out.rewards.mean(0), 0, atol=1e-4) and np.allclose(out.rewards.std(0), 1, atol=1e-4)
    assert out.epistemic is not None and (out.epistemic > 0).all()

    man = read_manifest(result.out)
    assert (man.kind, len(man.members), len(man.shift), man.max_tokens) == ("heads", 1, 3, 128)
    assert man.members[0].uncertainty and man.members[0].delta is None
    assert man.training["config"]["num_heads"] == 3 and man.training["data"]["pairs"] == 96
    assert not (result.out / "checkpoint").exists()

    # progress: the events the Train RPC will stream, and the JSON log
    kinds = {e.event for e in events}
    assert {"start", "phase", "step", "epoch", "done"} <= kinds
    steps = [e for e in events if e.event == "step" and e.phase == "train"]
    assert steps[-1].step == steps[-1].total == 8 * 6
    assert all(e.loss is not None and e.accuracy is not None and e.eta_s is not None for e in steps)
    assert events[-1].event == "done" and events[-1].report is rep
    lines = [json.loads(x) for x in (result.out / "train_log.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "start" and any(x["event"] == "step" for x in lines)

    # a second run over the same data and backbone reads the cached features
    again = train(config(tmp_path, tiny_llama_backbone, synth["train"], epochs=1, overwrite=True))
    assert again.report["features"]["cache_hit"] is True


def test_trainer_lbfgs_heads_on_a_layer_cut_learn_the_rule_and_serve_it(tmp_path, tiny_llama4_backbone, synth):
    train_path, test_path = synth["train"], synth["test"]
    cfg_kw = dict(data=str(train_path), out=str(tmp_path / "rm"), backbone=str(tiny_llama4_backbone), max_tokens=128,
                  kind="heads", num_heads=3, head_solver="lbfgs", num_layers=3, calib_frac=0.0,
                  feature_cache=str(tmp_path / "cache"), dev=str(test_path))
    events = []
    result = train(TrainConfig(**cfg_kw), progress=events.append)
    rep = result.report
    assert rep["train"]["accuracy"] >= 0.97 and rep["dev"]["accuracy"] >= 0.95
    assert rep["heads"]["solver"] == "lbfgs" and rep["heads"]["chosen_by"].startswith("5-fold")
    assert set(rep["heads"]["cv_accuracy"]) and rep["heads"]["l2"] in [float(k) for k in rep["heads"]["cv_accuracy"]]
    steps = [e for e in events if e.event == "step" and e.phase == "train"]
    assert [e.step for e in steps] == [1, 2, 3] and steps[-1].total == 3
    # no held-out slice: the temperature is fitted on out-of-fold rewards of all training pairs
    assert rep["calibration_split"] is None and rep["cross_fitted"]["pairs"] == 96
    assert rep["temperature"] != 1.0 and 0.5 < rep["cross_fitted"]["accuracy"] <= 1.0
    man = read_manifest(result.out)
    assert man.members[0].num_layers == 3
    served = evaluate(result.out, train_path, write=False)  # through the serving engine, cut backbone
    for key in ("accuracy", "ece", "nll", "auroc_std"):
        assert served[key] == pytest.approx(rep["train"][key], abs=1e-4), key


def test_lora_members_learn_the_rule_and_store_merged_deltas(tmp_path, tiny_llama_backbone, synth):
    cfg = config(tmp_path, tiny_llama_backbone, synth["train"], kind="members", num_heads=2,
                 finetune_layers=1, lora_rank=4, epochs=2, dev=str(synth["test"]))
    result = train(cfg)
    rep = result.report
    assert rep["train"]["accuracy"] >= 0.97 and rep["dev"]["accuracy"] >= 0.95
    # trained on cached states of the frozen first layer; served with full forwards over base + delta
    assert rep["features"]["prefix_first_layer"] == 1 and rep["features"]["problem"] is None
    served = evaluate(result.out, synth["train"], write=False)
    for key in ("accuracy", "ece", "nll", "reward_mean", "reward_std", "auroc_std"):
        assert served[key] == pytest.approx(rep["train"][key], abs=1e-4), key
    man = read_manifest(result.out)
    assert [m.name for m in man.members] == ["member0", "member1"]
    assert [(m.adapter, m.trained_layers) for m in man.members] == [("lora-r4", [1])] * 2
    # served over one shared trunk (layer 0 once), each member's own layer 1: the scores above
    model = load_model(result.out)
    assert model.members[0].backbone is model.members[1].backbone and model.members[0].top.start == 1
    assert man.ood is not None and all(m.ood for m in man.members)
    base = load_backbone(str(tiny_llama_backbone)).model.state_dict()
    deltas = [load_file(result.out / m.name / m.delta) for m in man.members]
    assert set(deltas[0]) == {f"layers.1.{p}.weight" for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    name = "layers.1.self_attn.q_proj.weight"
    assert not torch.equal(deltas[0][name], base[name])          # LoRA merged into the weight
    assert not torch.equal(deltas[0][name], deltas[1][name])     # members differ (seed, order)


def test_resume_after_a_stop_gives_the_same_ensemble_as_an_uninterrupted_run(tmp_path, tiny_llama_backbone, synth):
    data = synth["small"]
    kw = dict(kind="members", num_heads=2, finetune_layers=1, epochs=2, bootstrap=True)
    full = train(config(tmp_path / "a", tiny_llama_backbone, data, **kw))

    cfg = config(tmp_path / "b", tiny_llama_backbone, data, **kw)
    per_member = 2 * 3
    seen = []
    with pytest.raises(TrainingStopped):
        train(cfg, progress=seen.append,
              should_stop=lambda: any(e.phase == "train" and e.event == "step" and e.step >= per_member + 2 for e in seen))
    assert (Path(cfg.out) / "checkpoint" / "state.json").is_file() and not (Path(cfg.out) / "manifest.json").exists()
    with pytest.raises(FileExistsError, match="resume"):
        train(cfg)
    with pytest.raises(ValueError, match="different lr"):
        train(config(tmp_path / "b", tiny_llama_backbone, data, **kw, lr=0.5, resume=True))

    events = []
    resumed = train(config(tmp_path / "b", tiny_llama_backbone, data, **kw, resume=True), progress=events.append)
    first = next(e for e in events if e.event == "step" and e.phase == "train")
    assert first.step > per_member  # member 0 came from the checkpoint, member 1 continued mid-epoch
    assert resumed.report["features"]["cache_hit"] is True  # the frozen layer's states were cached
    ma, mb = read_manifest(full.out), read_manifest(resumed.out)
    assert ma.shift == pytest.approx(mb.shift, abs=1e-6) and ma.scale == pytest.approx(mb.scale, abs=1e-6)
    for m in ma.members:
        for f in (m.heads, m.delta, m.uncertainty):
            a, b = load_file(full.out / m.name / f), load_file(resumed.out / m.name / f)
            assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), (m.name, f)


def test_temperature_is_fit_on_a_held_out_slice_of_train_and_folded_into_scale(tmp_path, tiny_llama_backbone, synth):
    cfg = config(tmp_path, tiny_llama_backbone, synth["noisy"], num_heads=2, epochs=6, calib_frac=0.25,
                 min_calib_pairs=20, lr=5e-2)
    rep = train(cfg).report
    t = rep["temperature"]
    assert t != 1.0 and rep["data"]["calibration_pairs"] == 40 and rep["data"]["fit_pairs"] == 120
    assert rep["calibration_split"]["nll"] <= rep["calibration_split_before_temperature"]["nll"] + 1e-12
    man = read_manifest(cfg.out)
    assert man.training["temperature"] == t
    # folding T into scale divides every served reward by T: the reward std over train is 1/T
    served = evaluate(cfg.out, synth["noisy"], write=False)
    assert served["accuracy"] == pytest.approx(
        (rep["train"]["accuracy"] * 120 + rep["calibration_split"]["accuracy"] * 40) / 160, abs=1e-9)


def test_the_output_directory_is_protected(tmp_path, tiny_llama_backbone, synth):
    out = tmp_path / "rm"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite"):
        train(config(tmp_path, tiny_llama_backbone, synth["train"]))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(config(tmp_path, tiny_llama_backbone, synth["train"], resume=True))
    with pytest.raises(ValueError, match="frozen members"):
        config(tmp_path, tiny_llama_backbone, synth["train"], kind="members")
