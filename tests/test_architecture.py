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
    ("rmserve/service/engine/leak.py", "from rmserve.service.server import scheduler\n", "The model layer"),
    ("rmserve/training/leak.py", "from rmserve.service.server.app import RewardServer\n", "Training builds"),
    ("rmserve/client/leak.py", "import torch\n", "The client SDK"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path, where, line, contract):
    staged = lint_imports.stage(tmp_path)
    (staged / where).write_text(line)
    proc = lint_imports.lint(staged)
    assert proc.returncode != 0
    broken = [ln for ln in proc.stdout.splitlines() if "BROKEN" in ln or contract in ln]
    assert any(contract in ln for ln in broken), proc.stdout


def test_the_service_folder_holds_only_layer_packages():
    """The contracts name packages, so every module must live in one: a module dropped straight
    into service/ (besides the CLI, which dispatches to the server and the trainer) would
    belong to no layer and escape every contract."""
    loose = {p.name for p in (ROOT / "service").glob("*.py")} - {"__init__.py", "cli.py"}
    assert not loose, f"service/ modules outside a layer package: {sorted(loose)}"
    contracts = _contracts()
    for cid in ("model-layer", "training"):
        assert "rmserve.service.server" in contracts[cid]["forbidden_modules"], cid
    assert contracts["server-training"]["source_modules"] == ["rmserve.service.server"]
    assert not contracts["server-training"].get("ignore_imports"), "the server imports no training module"


def test_the_server_may_not_import_training(tmp_path):
    staged = lint_imports.stage(tmp_path)
    (staged / "rmserve/service/server/leak.py").write_text("from rmserve.training import trainer\n")
    proc = lint_imports.lint(staged)
    assert proc.returncode != 0 and "rmserve.service.server.leak" in proc.stdout, proc.stdout
