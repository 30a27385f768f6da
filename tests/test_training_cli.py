"""`rmserve train` / `rmserve eval` argument wiring, exit codes and output."""

from __future__ import annotations

import argparse
import json

from rmserve.training.cli import add_eval_args, add_train_args, run_eval, run_train


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rmserve")
    sub = p.add_subparsers(dest="command", required=True)
    add_train_args(sub.add_parser("train"))
    add_eval_args(sub.add_parser("eval"))
    return p


def write_rows(path, n=32):
    words = ["fox", "dog", "bread", "salt", "quick"]
    rows = [{"prompt": words[i % 5] + " " + words[(i * 3) % 5], "chosen": f"{words[i % 5]} thanks", "rejected": f"{words[i % 5]} no"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_then_eval_from_the_command_line(tmp_path, tiny_llama_backbone, capsys):
    data = write_rows(tmp_path / "train.jsonl")
    out = tmp_path / "rm"
    args = parser().parse_args([
        "train", "--data", str(data), "--out", str(out), "--backbone", str(tiny_llama_backbone), "-k", "2",
        "--epochs", "2", "--lr", "0.01", "--max-tokens", "96", "--feature-cache", str(tmp_path / "cache"), "--log-json",
        "--serve-dtype", "bfloat16",
    ])
    assert run_train(args) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[0]["event"] == "start" and lines[-1]["event"] == "done"
    assert lines[-1]["report"]["train"]["pairs"] == 32
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "bfloat16"

    # evaluated in float32, as training scored it (the manifest's bf16 is what `serve` would use)
    assert run_eval(parser().parse_args(["eval", str(out), "--data", str(data), "--dtype", "float32"])) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "ECE (20 bins)" in printed
    report = json.loads((out / "eval_train.json").read_text())
    assert report["accuracy"] == lines[-1]["report"]["train"]["accuracy"]


def test_bad_input_exits_2_with_the_file_and_line(tmp_path, tiny_llama_backbone, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n{broken\n")
    common = ["--out", str(tmp_path / "rm"), "--backbone", str(tiny_llama_backbone)]
    assert run_train(parser().parse_args(["train", "--data", str(data), "--strict", *common])) == 2
    assert f"{data}:2: invalid JSON" in capsys.readouterr().err
    assert run_train(parser().parse_args(["train", "--data", str(data), "--kind", "members", *common])) == 2
    assert "frozen members" in capsys.readouterr().err
