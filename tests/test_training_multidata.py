"""Training on several preference files: a pair keeps its file, reports count and measure per file,
several dev files are each reported by name, and a resume refuses another file list."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest

from rmserve.service.data.train_config import TrainConfig
from rmserve.service.engine.ensemble import read_manifest
from rmserve.training.cli import add_train_args, config_from_args
from rmserve.training.data import dataset_names
from rmserve.training.trainer import TrainingStopped, train
from tests.test_training_trainer import synthetic_rows, write_jsonl


def test_a_single_path_and_a_list_are_read_alike():
    one = TrainConfig(data="a.jsonl", out="o", dev="d.jsonl")
    assert (one.data_files, one.dev_files) == (["a.jsonl"], ["d.jsonl"])
    several = TrainConfig(data=["a.jsonl", "b.jsonl"], out="o")
    assert (several.data_files, several.dev_files) == (["a.jsonl", "b.jsonl"], [])
    assert TrainConfig.from_dict(json.loads(json.dumps(several.to_dict()))).data_files == ["a.jsonl", "b.jsonl"]
    assert TrainConfig(data="", out="o", from_store="s.sqlite3").data_files == []
    with pytest.raises(ValueError, match=r"names a file twice: a\.jsonl"):
        TrainConfig(data=["a.jsonl", "a.jsonl"], out="o")
    with pytest.raises(ValueError, match="dev must be a path or a list of paths"):
        TrainConfig(data="a.jsonl", out="o", dev=[3])
    with pytest.raises(ValueError, match="either as a file"):
        TrainConfig(data=[], out="o")


def test_dataset_names_are_folder_names_when_unique_else_stems(tmp_path):
    assert dataset_names(["x/helpful/train.jsonl", "y/harmless/train.jsonl"]) == ["helpful", "harmless"]
    assert dataset_names(["x/data/helpful.jsonl", "x/data/harmless.jsonl"]) == ["helpful", "harmless"]
    assert dataset_names(["x/data/train.jsonl", "y/data/train.jsonl", "z/other/t.jsonl"]) == ["train", "train-2", "other"]
    with pytest.raises(ValueError, match="given twice"):
        dataset_names([tmp_path / "a.jsonl", tmp_path / "." / "a.jsonl"])


def test_the_cli_takes_several_data_and_dev_files():
    p = argparse.ArgumentParser()
    add_train_args(p)
    cfg = config_from_args(p.parse_args(["--data", "a.jsonl", "b.jsonl", "--data", "c.jsonl", "--dev", "d.jsonl",
                                         "--out", "o"]))
    assert (cfg.data, cfg.dev) == (["a.jsonl", "b.jsonl", "c.jsonl"], "d.jsonl")
    cfg = config_from_args(p.parse_args(["--data", "a.jsonl", "--dev", "d.jsonl", "--dev", "e.jsonl", "--out", "o"]))
    assert (cfg.data, cfg.dev) == ("a.jsonl", ["d.jsonl", "e.jsonl"])  # one file stays a path, as before
    assert config_from_args(p.parse_args(["--data", "a.jsonl", "--out", "o"])).dev is None


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sets")
    (d / "alpha").mkdir()
    (d / "beta").mkdir()
    return {
        "a": write_jsonl(d / "alpha" / "train.jsonl", synthetic_rows(40, seed=11)),
        "b": write_jsonl(d / "beta" / "train.jsonl", synthetic_rows(24, seed=12)),
        "dev_a": write_jsonl(d / "alpha" / "dev.jsonl", synthetic_rows(12, seed=13)),
        "dev_b": write_jsonl(d / "beta" / "dev.jsonl", synthetic_rows(8, seed=14)),
    }


def config(tmp_path: Path, backbone: Path, data, **kw) -> TrainConfig:
    base = dict(data=data, out=str(tmp_path / "rm"), backbone=str(backbone), max_tokens=96, num_heads=2, epochs=2,
                lr=1e-2, calib_frac=0.25, min_calib_pairs=5, ood_quantile=None, feature_cache=str(tmp_path / "cache"))
    return TrainConfig(**{**base, **kw})


def test_two_training_files_and_two_dev_files(tmp_path, tiny_llama_backbone, two_sets):
    s = two_sets
    cfg = config(tmp_path, tiny_llama_backbone, [str(s["a"]), str(s["b"])], dev=[str(s["dev_a"]), str(s["dev_b"])])
    rep = train(cfg).report

    files = rep["data"]["files"]
    assert [(f["origin"], f["rows"], f["pairs"]) for f in files] == [("alpha", 40, 40), ("beta", 24, 24)]
    assert rep["data"]["rows"] == rep["data"]["pairs"] == 64
    man = read_manifest(cfg.out).training["data"]
    assert [(f["path"], f["sha256"]) for f in man["files"]] == [
        (str(p.resolve()), hashlib.sha256(p.read_bytes()).hexdigest()) for p in (s["a"], s["b"])]
    assert "path" not in man and man["pairs"] == 64

    # train and held-out slice: the whole and each dataset, whose pairs add up to it
    for key in ("train", "calibration_split"):
        block = rep[key]
        assert list(block["per_origin"]) == ["alpha", "beta"], key
        assert sum(b["pairs"] for b in block["per_origin"].values()) == block["pairs"]
        assert "length_split" in block["per_origin"]["alpha"]
    assert rep["data"]["fit_pairs"] + rep["data"]["calibration_pairs"] == 64

    # each dev file evaluated and reported by its name, its report next to the model
    assert rep["dev"] is None
    assert {n: d["pairs"] for n, d in rep["dev_sets"].items()} == {"alpha": 12, "beta": 8}
    assert json.loads((Path(cfg.out) / "eval_alpha_dev.json").read_text())["pairs"] == 12
    assert json.loads((Path(cfg.out) / "eval_beta_dev.json").read_text())["pairs"] == 8


def test_cross_fitted_metrics_are_given_per_dataset(tmp_path, tiny_llama_backbone, two_sets):
    cfg = config(tmp_path, tiny_llama_backbone, [str(two_sets["a"]), str(two_sets["b"])], head_solver="lbfgs",
                 num_heads=1, calib_frac=0.0, head_l2=1.0)
    cross = train(cfg).report["cross_fitted"]
    assert {n: b["pairs"] for n, b in cross["per_origin"].items()} == {"alpha": 40, "beta": 24}
    assert sum(g["n"] for g in cross["length_split"].values()) == 64


def test_one_file_keeps_the_single_file_shape(tmp_path, tiny_llama_backbone, two_sets):
    cfg = config(tmp_path, tiny_llama_backbone, str(two_sets["b"]), dev=str(two_sets["dev_b"]), epochs=1)
    rep = train(cfg).report
    assert rep["dev"]["pairs"] == 8 and list(rep["dev_sets"]) == ["beta"]
    assert "per_origin" not in rep["train"] and rep["data"]["files"][0]["origin"] == "beta"
    man = read_manifest(cfg.out).training["data"]
    assert man["path"] == str(two_sets["b"].resolve()) and len(man["files"]) == 1


def test_resume_refuses_another_file_list(tmp_path, tiny_llama_backbone, two_sets):
    a, b = str(two_sets["a"]), str(two_sets["b"])
    seen: list = []
    with pytest.raises(TrainingStopped):  # stopped after its first step: a checkpoint to resume
        train(config(tmp_path, tiny_llama_backbone, [a, b]), progress=seen.append,
              should_stop=lambda: any(e.phase == "train" and e.event == "step" for e in seen))
    for other in ([b, a], [a]):
        with pytest.raises(ValueError, match="training data"):
            train(config(tmp_path, tiny_llama_backbone, other, resume=True))
    assert train(config(tmp_path, tiny_llama_backbone, [a, b], resume=True)).report["data"]["pairs"] == 64
