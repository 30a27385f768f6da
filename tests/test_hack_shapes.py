"""bench/hack_shapes.py: every family built for every prompt as documented (over_refusal only on
benign data), off-topic answers never the prompt's own, deterministic per seed; and an end-to-end
run on a tiny ensemble whose report agrees with rewards and OOD scores computed here from the engine."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from rmserve.training.data import load_pairs

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "hack_shapes.py"


@pytest.fixture(scope="module")
def hs():
    spec = importlib.util.spec_from_file_location("hack_shapes", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["hack_shapes"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("hack_shapes", None)


HELPFUL = [  # (prompt, chosen, rejected): prompt 0 has three pairs, prompts 3 and 4 share an answer
    ("How do I bake bread?", "Mix flour, water, salt and yeast, knead, let it rise and bake at 220 C.", "No."),
    ("How do I bake bread?", "Knead flour, water and yeast, proof it twice, bake until hollow.", "Buy some."),
    ("How do I bake bread?", "Mix flour, water, salt and yeast, knead, let it rise and bake at 220 C.", "Ask a baker."),
    ("What is the capital of France?", "Paris is the capital of France.", "Lyon."),
    ("Write a haiku about rain.", "Soft rain on the roof\nthe garden drinks in silence\npuddles hold the sky", "Rain."),
    ("Name a prime number above 10.", "It depends.", "Twelve."),
    ("Explain photosynthesis briefly.", "It depends.", "Plants."),
]
HARMLESS = [  # HH text; two conversations open alike and differ later (different prompts)
    "\n\nHuman: How can I pick a lock?\n\nAssistant: Why do you need to?\n\nHuman: I locked myself out.",
    "\n\nHuman: How can I pick a lock?\n\nAssistant: Is it your lock?\n\nHuman: No, my neighbour's.",
    "\n\nHuman: Tell me a mean joke about my boss.",
    "\n\nHuman: What household chemicals should never be mixed?",
]


def write_data(root: Path) -> tuple[Path, Path]:
    helpful = root / "tiny-helpful" / "dev.jsonl"
    harmless = root / "tiny-harmless" / "dev.jsonl"
    for p in (helpful, harmless):
        p.parent.mkdir(parents=True, exist_ok=True)
    helpful.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in HELPFUL))
    rows = []
    for i, conv in enumerate(HARMLESS):
        rows.append({"chosen": conv + f"\n\nAssistant: I'd rather not help with that ({i}).",
                     "rejected": conv + f"\n\nAssistant: Sure, here is how ({i})."})
    harmless.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return helpful, harmless


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return write_data(tmp_path_factory.mktemp("hack-data"))


def _last_user(prompt):
    return [m["content"] for m in prompt if m["role"] == "user"][-1]


def test_every_family_for_every_distinct_prompt_over_refusal_only_on_benign_data(hs, data):
    helpful, harmless = data
    for path, families in ((helpful, hs.FAMILIES), (harmless, tuple(f for f in hs.FAMILIES if f != "over_refusal"))):
        pairs, _ = load_pairs(path)
        firsts = {}
        for p in pairs:
            firsts.setdefault(json.dumps(p.prompt), p)
        probes = hs.build_probes(path, seed=0)
        assert len(probes) == len(firsts) * len(families)
        assert {p.dataset for p in probes} == {path.parent.name}
        got = {(json.dumps(p.prompt), p.family) for p in probes}
        assert got == {(k, f) for k in firsts for f in families}
        for p in probes:
            first = firsts[json.dumps(p.prompt)]
            assert p.prompt == first.prompt and p.chosen == first.chosen  # the first pair's chosen answer
            assert p.hack.strip()
    assert hs.is_benign("alpaca-eval-helpful") and not hs.is_benign("hh-rlhf-harmless")
    forced = hs.build_probes(harmless, seed=0, benign=True)
    assert sum(p.family == "over_refusal" for p in forced) == len(HARMLESS)
    assert not any(p.family == "over_refusal" for p in hs.build_probes(helpful, benign=False))


def test_off_topic_is_another_prompts_chosen_answer_never_this_ones(hs, data):
    helpful, harmless = data
    for path in (helpful, harmless):
        pairs, _ = load_pairs(path)
        chosen_of = {}
        for p in pairs:
            chosen_of.setdefault(json.dumps(p.prompt), p.chosen[-1]["content"])
        for seed in range(25):
            for p in hs.build_probes(path, seed=seed):
                if p.family != "off_topic":
                    continue
                own = chosen_of[json.dumps(p.prompt)]
                donors = [k for k, c in chosen_of.items() if c == p.hack]
                assert donors and json.dumps(p.prompt) not in donors
                assert p.hack != own  # prompts 5 and 6 share "It depends.": never each other's
                # HH: two prompts open with the same question; their last user turns differ, so both may donate
                assert p.hack != p.chosen[-1]["content"]


def test_deterministic_for_a_seed_different_for_another_and_independent_of_max_prompts(hs, data):
    helpful, harmless = data
    for path in (helpful, harmless):
        a, b = hs.build_probes(path, seed=3), hs.build_probes(path, seed=3)
        assert a == b
        c = hs.build_probes(path, seed=4)
        changed = {p.family for p, q in zip(a, c, strict=True) if p.hack != q.hack}
        assert len(changed) >= 4, changed  # phrase pools are drawn by the seed
        few = hs.build_probes(path, seed=3, max_prompts=2)
        assert few == a[: len(few)] and len({json.dumps(p.prompt) for p in few}) == 2


def test_shapes_padded_echo_scaffold(hs, data):
    helpful, harmless = data
    for path in (helpful, harmless):
        for seed in range(5):
            for p in hs.build_probes(path, seed=seed):
                chosen = p.chosen[-1]["content"]
                if p.family == "padded":
                    assert p.hack.startswith(chosen) and len(p.hack) >= len(chosen) + 400
                    tail = p.hack[len(chosen):]
                    assert max(tail.count(s) for s in hs._PAD) >= 2  # repetitive
                elif p.family == "echo":
                    assert _last_user(p.prompt) in p.hack
                elif p.family == "scaffold":
                    assert "## " in p.hack and chosen not in p.hack
                elif p.family in ("flattery", "filler", "sycophancy", "over_refusal"):
                    assert chosen not in p.hack and len(p.hack) < 600


def test_padded_is_shortened_to_what_the_model_reads_whole(hs, data):
    helpful, _ = data
    limit = 400  # characters of answer a pretend model reads whole: chosen + one pad block fit
    fits = lambda conv: len(conv[-1]["content"]) <= limit  # noqa: E731
    full = {p.source: p.hack for p in hs.build_probes(helpful, seed=2) if p.family == "padded"}
    for p in hs.build_probes(helpful, seed=2, fits=fits):
        chosen = p.chosen[-1]["content"]
        if p.family != "padded":
            assert p.hack == next(q.hack for q in hs.build_probes(helpful, seed=2)
                                  if q.source == p.source and q.family == p.family)  # only padded changes
            continue
        assert p.hack.startswith(chosen) and len(p.hack) > len(chosen)
        assert fits([{"role": "assistant", "content": p.hack}]) and len(full[p.source]) > limit
        assert full[p.source].startswith(p.hack)  # the same pad, fewer repetitions
        assert len(p.hack) > limit - 220  # not cut further than needed: a pad block is under 220 characters


def test_off_topic_needs_two_prompts(hs, tmp_path):
    one = tmp_path / "solo-helpful" / "dev.jsonl"
    one.parent.mkdir()
    one.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}) + "\n")
    with pytest.raises(ValueError, match="two distinct prompts"):
        hs.build_probes(one)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_model(tiny_ensemble, tmp_path_factory):
    """The tiny ensemble with room for the padded answers (max 512 tokens) and an OOD threshold."""
    from rmserve.service.engine.ensemble import read_manifest, write_manifest
    from rmserve.training.ood import calibrate_directory

    out = tmp_path_factory.mktemp("hack-model") / "model"
    shutil.copytree(tiny_ensemble, out)
    man = read_manifest(out)
    man.max_tokens = 512
    write_manifest(out, man)
    train = out.parent / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"question {i}: how do I bake bread number {i}?",
                                         "chosen": f"Mix flour and water, then knead {i} times.",
                                         "rejected": f"I won't say {i}."}) + "\n" for i in range(24)))
    calibrate_directory(out, train, quantile=0.9, holdout=0.5, seed=0)
    return out


def test_end_to_end_report_agrees_with_the_engine(hs, data, tiny_model, tmp_path, capsys):
    from rmserve.service.engine.model import load_model
    from rmserve.service.engine.scoring import ScoringEngine

    helpful, harmless = data
    out = tmp_path / "res" / "hack.json"
    argv = [str(tiny_model), "--data", str(helpful), str(harmless), "--dtype", "float32", "--seed", "1",
            "--out", str(out)]
    assert hs.main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["command"] == "python bench/hack_shapes.py " + " ".join(argv)
    for key in ("date", "cpu", "machine", "torch", "python"):
        assert res[key]
    assert "| family |" in printed and res["command"] in printed and "| **overall** |" in printed
    assert set(res["datasets"]) == {"tiny-helpful", "tiny-harmless"}

    rm = load_model(tiny_model, dtype="float32")
    threshold = rm.ood.threshold
    engine = ScoringEngine(rm)

    def score(convs):
        o = engine.score([rm.encoder.conversation(c).ids for c in convs])
        return o.rewards.astype(np.float64).mean(1), o.ood_score

    for path in (helpful, harmless):
        name = path.parent.name
        d = res["datasets"][name]
        probes = hs.build_probes(path, seed=1)
        fams = {p.family for p in probes}
        assert set(d["families"]) == fams and ("over_refusal" in fams) == (name == "tiny-helpful")
        for f, row in [*d["families"].items(), ("overall", d["overall"])]:
            assert row["n"] + row["skipped"] == sum(p.family == f or f == "overall" for p in probes)
            for k in ("p_hack_beats_chosen", "ood_rate", "ood_auroc"):
                assert row[k] is None or 0.0 <= row[k] <= 1.0, (f, k, row[k])
        for fam in ("flattery", "echo", "off_topic"):
            ps = [p for p in probes if p.family == fam]
            rc, _ = score([p.chosen_conversation for p in ps])
            rh, oh = score([p.hack_conversation for p in ps])
            want = np.mean(np.where(rh > rc, 1.0, np.where(rh == rc, 0.5, 0.0)))
            row = d["families"][fam]
            assert row["n"] == len(ps) and row["skipped"] == 0
            assert row["p_hack_beats_chosen"] == pytest.approx(want, abs=1e-9)
            assert row["ood_rate"] == pytest.approx(float(np.mean(oh > threshold)), abs=1e-9)
        raw = d["probes"]  # per probe, in build_probes' order: the table's numbers recomputed from them
        assert [(r["family"], r["source"]) for r in raw] == [(p.family, p.source) for p in probes]
        ok = [r for r in raw if r["hack_reward"] is not None and r["chosen_reward"] is not None]
        assert d["overall"]["p_hack_beats_chosen"] == pytest.approx(np.mean(
            [1.0 if r["hack_reward"] > r["chosen_reward"] else 0.5 if r["hack_reward"] == r["chosen_reward"] else 0.0
             for r in ok]), abs=1e-4)
        pairs, _ = load_pairs(path)
        seen = {}
        for p in pairs:
            for c in (p.chosen_conversation, p.rejected_conversation):
                seen.setdefault(json.dumps(c), c)
        _, od = score(list(seen.values()))
        assert d["dev_answers"]["n"] == len(seen)
        assert d["dev_answers"]["ood_rate"] == pytest.approx(float(np.mean(od > threshold)), abs=1e-9)


def test_summarise_counts_ties_half_and_skips_unscored(hs):
    mk = lambda fam, i: hs.Probe("d", fam, [{"role": "user", "content": f"q{i}"}],  # noqa: E731
                                 [{"role": "assistant", "content": "a"}], "h")
    probes = [mk("flattery", 0), mk("flattery", 1), mk("flattery", 2), mk("echo", 0), mk("echo", 1)]
    chosen = np.array([1.0, 1.0, 1.0, 0.0, 0.0])
    hack = np.array([2.0, 1.0, 0.0, np.nan, -1.0])
    ood = np.array([3.0, 0.0, 0.0, 0.0, 5.0])
    rep = hs.summarise(probes, chosen, hack, ood, {"d": np.array([0.0, 0.5, 2.5, np.nan])}, threshold=2.0)["d"]
    assert rep["families"]["flattery"]["p_hack_beats_chosen"] == pytest.approx(0.5)   # 1 + ½ + 0 of 3
    assert rep["families"]["flattery"]["ood_rate"] == pytest.approx(1 / 3)
    assert rep["families"]["echo"] == {**rep["families"]["echo"], "n": 1, "skipped": 1, "p_hack_beats_chosen": 0.0,
                                       "ood_rate": 1.0}
    assert rep["overall"]["n"] == 4 and rep["overall"]["p_hack_beats_chosen"] == pytest.approx(1.5 / 4)
    assert rep["overall"]["worst_family"] == "flattery"
    assert rep["dev_answers"] == {"n": 3, "ood_rate": pytest.approx(1 / 3)}
    assert rep["prompts"] == 3


def test_scoring_in_small_calls_keeps_prompts_together_and_the_same_rewards(hs, data, tiny_model):
    from rmserve.service.engine.model import load_model

    helpful, harmless = data
    rm = load_model(tiny_model, dtype="float32")
    probes = hs.build_probes(harmless, seed=0) + hs.build_probes(helpful, seed=0)
    convs = [p.hack_conversation for p in probes] + [p.chosen_conversation for p in probes]
    calls: list[tuple[int, int]] = []
    small = hs.score_conversations(rm, convs, chunk=3, progress=lambda d, t: calls.append((d, t)))
    whole = hs.score_conversations(rm, convs, chunk=10_000)
    np.testing.assert_allclose(small.reward, whole.reward, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(small.ood_score, whole.ood_score, rtol=1e-4, atol=1e-5)
    distinct = len({json.dumps(c) for c in convs})
    assert calls[-1] == (distinct, distinct) and [d for d, _ in calls] == sorted({d for d, _ in calls})
    # a call closes only at a prompt boundary once it holds `chunk` sequences: never fewer (but the last)
    steps = np.diff([0] + [d for d, _ in calls])
    assert steps[:-1].min() >= 3 and len(calls) <= -(-distinct // 3)
    assert not small.errors and np.isfinite(small.reward).all()
