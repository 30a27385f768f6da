"""The import layers (docs/architecture.md) hold, and the check that enforces them can fail."""

from __future__ import annotations

import importlib.util
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("lint_imports", ROOT / "scripts" / "lint_imports.py")
lint_imports = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lint_imports)

pytestmark = pytest.mark.skipif(
    not Path(lint_imports.sys.executable).with_name("lint-imports").exists(), reason="import-linter is not installed"
)


def _contracts() -> dict[str, dict]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in cfg["contracts"]}


def test_the_layer_contracts_hold(tmp_path):
    proc = lint_imports.lint(lint_imports.stage(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(_contracts())} kept, 0 broken" in proc.stdout


@pytest.mark.parametrize(("where", "line", "contract"), [
    ("rmserve/service/engine/leak.py", "import grpc\n", "The model layer"),
    ("rmserve/service/engine/leak.py", "from rmserve.service import scheduler\n", "The model layer"),
    ("rmserve/training/leak.py", "from rmserve.service.server import RewardServer\n", "Training builds"),
    ("rmserve/client/leak.py", "import torch\n", "The client SDK"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path, where, line, contract):
    staged = lint_imports.stage(tmp_path)
    (staged / where).write_text(line)
    proc = lint_imports.lint(staged)
    assert proc.returncode != 0
    broken = [ln for ln in proc.stdout.splitlines() if "BROKEN" in ln or contract in ln]
    assert any(contract in ln for ln in broken), proc.stdout


def test_every_server_module_is_named_in_the_contracts():
    """The server's modules are listed by name; a new one must join the lists."""
    contracts = _contracts()
    server = {f"rmserve.service.{p.stem}" for p in (ROOT / "service").glob("*.py") if p.stem != "__init__"}
    for cid in ("model-layer", "training"):
        missing = server - set(contracts[cid]["forbidden_modules"])
        assert not missing, f"contract {cid!r} does not forbid {sorted(missing)}"
    sources = set(contracts["server-training"]["source_modules"]) | {"rmserve.service.cli"}
    assert server == sources, f"server-training contract: {sorted(server ^ sources)}"
