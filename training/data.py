"""Preference data: JSONL rows -> pairs of chat conversations.

Accepted rows (one JSON object per line; blank lines are ignored):

- `{"chosen": ..., "rejected": ...}`: two whole conversations, either HH-RLHF
  text (`"\\n\\nHuman: ...\\n\\nAssistant: ..."`) or lists of chat messages. The
  longest common run of leading messages is the prompt; the rest of each side is
  the response.
- `{"prompt": ..., "chosen": ..., "rejected": ...}`: prompt as text (one user
  turn) or messages; responses as text (one assistant turn), one message or a
  list of messages.
- `{"prompt": ..., "responses": [...], "ranking": [...]}`: `ranking[i]` is the
  rank of `responses[i]`, lower is better, equal ranks are ties. Every untied
  pair (i better than j) becomes a pair, each weighted (G - 1) / P where G is the
  number of distinct ranks and P the number of untied pairs: the list weighs as
  much as the G - 1 comparisons that determine its order, so a two-response list
  counts like one pair and a long list cannot dominate through its O(n²) pairs.

Every row may carry `margin` (default 0; the loss asks r_c - r_r > margin) and
`weight` (default 1, multiplies the pair weights).

Ties (`"tie": true`, identical responses, equal ranks) carry no Bradley-Terry
signal: they are skipped and counted, never an error. Malformed rows are errors:
skipped and reported with file:line and why, or in strict mode raised at the
first one. Nothing is dropped without a line in the report.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmserve.service.engine.tokenization import ROLES

Message = dict[str, str]

MAX_EXAMPLES = 5  # per reason, in the report


class DataError(ValueError):
    """A bad row (strict mode) or unusable data; the message starts with file:line."""


class RowError(Exception):
    """Raised inside row parsing; the loader adds file:line."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Pair:
    """One comparison: prompt + chosen beats prompt + rejected."""

    prompt: list[Message]
    chosen: list[Message]      # the response messages (normally one assistant turn)
    rejected: list[Message]
    weight: float = 1.0
    margin: float = 0.0
    source: str = ""           # "file:line"; pairs of one ranked list share it
    origin: str = ""           # the dataset (file) it came from: `dataset_names`; "" when unnamed

    @property
    def chosen_conversation(self) -> list[Message]:
        return self.prompt + self.chosen

    @property
    def rejected_conversation(self) -> list[Message]:
        return self.prompt + self.rejected


@dataclass
class DataReport:
    """What was read, used, skipped and why: travels into every training/eval report."""

    rows: int = 0
    pairs: int = 0
    errors: Counter = field(default_factory=Counter)     # reason -> rows (or pairs, for encoding)
    ties: Counter = field(default_factory=Counter)       # kind -> pairs skipped as ties
    notes: Counter = field(default_factory=Counter)      # harmless normalisations, counted
    examples: dict[str, list[str]] = field(default_factory=dict)

    def error(self, reason: str, where: str, detail: str = "") -> None:
        self.errors[reason] += 1
        self._example(reason, where, detail)

    def tie(self, kind: str, where: str, n: int = 1) -> None:
        self.ties[kind] += n
        self._example(f"tie: {kind}", where, "")

    def note(self, kind: str, n: int = 1) -> None:
        self.notes[kind] += n

    def _example(self, reason: str, where: str, detail: str) -> None:
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(f"{where}: {detail}" if detail else where)

    def add(self, other: DataReport) -> None:
        """Count `other` (another file's report) in this one: several files read as one data set."""
        self.rows += other.rows
        self.pairs += other.pairs
        self.errors.update(other.errors)
        self.ties.update(other.ties)
        self.notes.update(other.notes)
        for reason, ex in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(ex[: MAX_EXAMPLES - len(mine)])

    @property
    def skipped(self) -> int:
        return sum(self.errors.values()) + sum(self.ties.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows, "pairs": self.pairs,
            "errors": dict(self.errors), "ties": dict(self.ties), "notes": dict(self.notes),
            "examples": self.examples,
        }

    def summary(self) -> str:
        lines = [f"{self.rows} rows -> {self.pairs} pairs"]
        for reason, n in self.errors.most_common():
            lines.append(f"  skipped {n} (error: {reason}), e.g. {'; '.join(self.examples.get(reason, [])[:2])}")
        for kind, n in self.ties.most_common():
            lines.append(f"  skipped {n} tied pair(s) ({kind})")
        for kind, n in self.notes.most_common():
            lines.append(f"  note: {kind} x{n}")
        return "\n".join(lines)


# -- conversations -----------------------------------------------------------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")


def parse_hh(text: str) -> list[Message]:
    """HH-RLHF text -> chat messages (Human -> user, Assistant -> assistant)."""
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise RowError("bad HH text", f"text before the first '\\n\\nHuman:' turn: {parts[0][:40]!r}")
    if len(parts) < 3:
        raise RowError("bad HH text", "no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2], strict=True)]


def _messages(value: Any, what: str) -> list[Message]:
    """A list of {role, content} messages (extra keys are dropped)."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RowError("bad field", f"{what} must be text or a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError("bad message", f"{what}[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise RowError("bad message", f"{what}[{i}] has role {m['role']!r}; use one of {sorted(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _conversation(value: Any, what: str) -> list[Message]:
    return parse_hh(value) if isinstance(value, str) else _messages(value, what)


def _response(value: Any, what: str) -> list[Message]:
    return [{"role": "assistant", "content": value}] if isinstance(value, str) else _messages(value, what)


def _prompt(value: Any) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if value.strip() else []
    if value is None or value == []:
        return []
    return _messages(value, "prompt")


def _merge_runs(msgs: list[Message], report: DataReport) -> list[Message]:
    """Join consecutive turns of one role (HH has a few '\\n\\nAssistant:' twice in a row)."""
    out: list[Message] = []
    for m in msgs:
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n\n" + m["content"]}
            report.note(f"merged consecutive {m['role']} turns")
        else:
            out.append(dict(m))
    return out


def _check_conversation(prompt: list[Message], response: list[Message], what: str) -> None:
    """The checks serving would make, so a row fails here, with its line, rather than at encode time."""
    if not response:
        raise RowError("empty response", f"{what} adds nothing to the shared prompt")
    msgs = prompt + response
    for i, m in enumerate(msgs):
        if not m["content"].strip():
            reason = "empty response" if i == len(msgs) - 1 else "empty turn"
            raise RowError(reason, f"{what}: message {i} ({m['role']}) is empty")
    if response[-1]["role"] != "assistant":
        raise RowError("bad conversation", f"{what} must end with an assistant message, not {response[-1]['role']!r}")


def _number(row: dict, key: str, default: float, *, minimum: float | None = None) -> float:
    v = row.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RowError("bad field", f"{key} must be a finite number, got {v!r}")
    if minimum is not None and v < minimum:
        raise RowError("bad field", f"{key} must be >= {minimum}, got {v!r}")
    return float(v)


# -- rows ------------------------------------------------------------------------

def parse_row(row: Any, where: str, report: DataReport) -> list[Pair]:
    """One JSON row -> its pairs (ties are counted in `report` and yield none)."""
    if not isinstance(row, dict):
        raise RowError("not a JSON object", type(row).__name__)
    weight = _number(row, "weight", 1.0, minimum=0.0)
    margin = _number(row, "margin", 0.0)
    if "responses" in row:
        return _ranked(row, where, weight, margin, report)
    if "chosen" not in row or "rejected" not in row:
        raise RowError(
            "unknown row format",
            f"keys {sorted(row)}; expected {{chosen, rejected}}, {{prompt, chosen, rejected}} or {{prompt, responses, ranking}}",
        )
    if "prompt" in row:
        prompt = _merge_runs(_prompt(row["prompt"]), report)
        chosen = _response(row["chosen"], "chosen")
        rejected = _response(row["rejected"], "rejected")
        if prompt and chosen[: len(prompt)] == prompt and rejected[: len(prompt)] == prompt:
            chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
            report.note("responses repeated the prompt; removed")
        chosen, rejected = _merge_runs(chosen, report), _merge_runs(rejected, report)
    else:
        c = _merge_runs(_conversation(row["chosen"], "chosen"), report)
        r = _merge_runs(_conversation(row["rejected"], "rejected"), report)
        n = 0
        while n < min(len(c), len(r)) and c[n] == r[n]:
            n += 1
        prompt, chosen, rejected = c[:n], c[n:], r[n:]
        if chosen and rejected and (chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant"):
            report.note("responses diverge before the last assistant turn")
    if row.get("tie") is True or chosen == rejected:
        report.tie("identical responses" if chosen == rejected else "marked tie", where)
        return []
    _check_conversation(prompt, chosen, "chosen")
    _check_conversation(prompt, rejected, "rejected")
    return [Pair(prompt, chosen, rejected, weight, margin, where)]


def _ranked(row: dict, where: str, weight: float, margin: float, report: DataReport) -> list[Pair]:
    if "prompt" not in row or "ranking" not in row:
        raise RowError("unknown row format", "a ranked row needs prompt, responses and ranking")
    prompt = _merge_runs(_prompt(row["prompt"]), report)
    responses, ranking = row["responses"], row["ranking"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise RowError("bad field", "responses must be a list of at least 2")
    if not isinstance(ranking, list) or len(ranking) != len(responses):
        raise RowError("bad field", f"ranking must be a list with one rank per response ({len(responses)})")
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in ranking):
        raise RowError("bad field", "ranking must hold finite numbers (lower is better)")
    resp = [_merge_runs(_response(r, f"responses[{i}]"), report) for i, r in enumerate(responses)]
    for i, r in enumerate(resp):
        _check_conversation(prompt, r, f"responses[{i}]")
    better = [(i, j) for i in range(len(resp)) for j in range(len(resp)) if ranking[i] < ranking[j]]
    tied = sum(1 for i in range(len(resp)) for j in range(i + 1, len(resp)) if ranking[i] == ranking[j])
    same = [(i, j) for i, j in better if resp[i] == resp[j]]
    if tied:
        report.tie("equal ranks", where, tied)
    if same:
        raise RowError("bad field", f"responses {same[0]} are identical but ranked differently")
    if not better:
        return []
    w = weight * (len(set(ranking)) - 1) / len(better)
    return [Pair(prompt, resp[i], resp[j], w, margin, where) for i, j in better]


# -- files -----------------------------------------------------------------------

def iter_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(file:line, parsed JSON or a RowError) for each non-blank line."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, RowError("invalid JSON", str(e))


def pairs_from_rows(
    rows: Iterable[tuple[str, Any]], *, strict: bool = False, report: DataReport | None = None
) -> tuple[list[Pair], DataReport]:
    """Rows as (where, object) -> pairs. Lets the preference store feed the trainer without files."""
    report = report or DataReport()
    pairs: list[Pair] = []
    for where, row in rows:
        report.rows += 1
        try:
            if isinstance(row, RowError):
                raise row
            got = parse_row(row, where, report)
        except RowError as e:
            if strict:
                raise DataError(f"{where}: {e}") from None
            report.error(e.reason, where, e.detail)
            continue
        pairs.extend(got)
    report.pairs = len(pairs)
    return pairs, report


def dataset_names(paths: Iterable[str | Path]) -> list[str]:
    """A short name per data file, for reports and `Pair.origin`: its parent folder's name when no
    other file shares that folder name (shared/data/hh-rlhf-harmless/train.jsonl -> hh-rlhf-harmless),
    else its stem; "-2", "-3"... where two would still be equal. The same file twice is refused."""
    paths = [Path(p) for p in paths]
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) < len(resolved):
        twice = next(p for p, r in zip(paths, resolved, strict=True) if resolved.count(r) > 1)
        raise ValueError(f"{twice} is given twice")
    parents = Counter(r.parent.name for r in resolved)
    names = [r.parent.name if r.parent.name and parents[r.parent.name] == 1 else r.stem for r in resolved]
    seen: Counter = Counter()
    out = []
    for name in names:
        seen[name] += 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def load_pairs(path: str | Path, *, strict: bool = False) -> tuple[list[Pair], DataReport]:
    """Read a JSONL preference file. Raises DataError if nothing usable is left."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"preference data {path}: no such file")
    pairs, report = pairs_from_rows(iter_jsonl(path), strict=strict)
    if not pairs:
        raise DataError(f"{path}: no usable pairs\n{report.summary()}")
    return pairs, report
