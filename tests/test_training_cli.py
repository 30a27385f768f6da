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


def test_eval_of_several_files_reports_each_and_refuses_one_report_path(tmp_path, tiny_llama_backbone, capsys):
    data = write_rows(tmp_path / "train.jsonl", n=24)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    dev_a = write_rows(tmp_path / "a" / "dev.jsonl", n=10)
    dev_b = write_rows(tmp_path / "b" / "dev.jsonl", n=15)
    out = tmp_path / "rm"
    assert run_train(parser().parse_args([
        "train", "--data", str(data), "--out", str(out), "--backbone", str(tiny_llama_backbone), "-k", "1",
        "--epochs", "1", "--max-tokens", "96", "--feature-cache", str(tmp_path / "cache"),
        "--ood-quantile", "none", "--dev", str(dev_a), str(dev_b),
    ])) == 0
    printed = capsys.readouterr().out  # a table per dev file, by its name
    assert f"dev a: {dev_a}" in printed and f"dev b: {dev_b}" in printed
    report = json.loads((out / "train_report.json").read_text())
    assert {n: d["pairs"] for n, d in report["dev_sets"].items()} == {"a": 10, "b": 15}

    # --data A B and --data A --data B are the same; each file gets its table and its report
    for argv in (["--data", str(data), str(dev_a), str(dev_b)], ["--data", str(data), "--data", str(dev_a), "--data", str(dev_b)]):
        assert run_eval(parser().parse_args(["eval", str(out), *argv, "--dtype", "float32"])) == 0
        printed = capsys.readouterr().out
        assert printed.count("length-balanced accuracy") == 3 and f"on {dev_b}" in printed
    pairs = {p: json.loads((out / p).read_text())["pairs"] for p in ("eval_train.json", "eval_a_dev.json", "eval_b_dev.json")}
    assert pairs == {"eval_train.json": 24, "eval_a_dev.json": 10, "eval_b_dev.json": 15}
    assert json.loads((out / "eval_b_dev.json").read_text())["data"] == str(dev_b)

    assert run_eval(parser().parse_args(["eval", str(out), "--data", str(data), str(dev_a), "--json"])) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["pairs"] for r in listed] == [24, 10] and [r["dataset"] for r in listed] == [tmp_path.name, "a"]

    bad = ["eval", str(out), "--data", str(data), str(dev_a), "--report", str(tmp_path / "r.json")]
    assert run_eval(parser().parse_args(bad)) == 2
    assert "--report names one file" in capsys.readouterr().err and not (tmp_path / "r.json").exists()
    assert run_eval(parser().parse_args(["eval", str(out), "--data", str(data), str(data)])) == 2
    assert "given twice" in capsys.readouterr().err
    # one file: the report where --report says, as before
    assert run_eval(parser().parse_args(["eval", str(out), "--data", str(dev_a), "--report", str(tmp_path / "r.json")])) == 0
    assert json.loads((tmp_path / "r.json").read_text())["pairs"] == 10


def test_bad_input_exits_2_with_the_file_and_line(tmp_path, tiny_llama_backbone, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n{broken\n")
    common = ["--out", str(tmp_path / "rm"), "--backbone", str(tiny_llama_backbone)]
    assert run_train(parser().parse_args(["train", "--data", str(data), "--strict", *common])) == 2
    assert f"{data}:2: invalid JSON" in capsys.readouterr().err
    assert run_train(parser().parse_args(["train", "--data", str(data), "--kind", "members", *common])) == 2
    assert "frozen members" in capsys.readouterr().err
