"""Every RMSERVE_* variable the project reads is documented in docs/configuration.md, and the
model layer's are read in one place (service/engine/settings.py)."""

from __future__ import annotations

import re
from pathlib import Path

from rmserve.service.engine.settings import EngineSettings

ROOT = Path(__file__).resolve().parents[1]
VAR = re.compile(r"\bRMSERVE_[A-Z][A-Z0-9_]*\b")


def _read_vars(*folders: str) -> dict[str, set[str]]:
    """variable -> files under `folders` (and the Dockerfile, deploy/) that name it."""
    out: dict[str, set[str]] = {}
    files = [ROOT / "Dockerfile", *(ROOT / "deploy").rglob("*.yaml")]
    for folder in folders:
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".sh", ".toml")]
    for path in files:
        for name in VAR.findall(path.read_text(errors="replace")):
            out.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return out


def test_every_variable_is_documented():
    documented = set(re.findall(r"`(RMSERVE_[A-Z0-9_]+)`", (ROOT / "docs" / "configuration.md").read_text()))
    used = _read_vars("service", "kernels", "training", "client", "examples", "bench", "tests", "scripts")
    missing = {name: sorted(files) for name, files in used.items() if name not in documented}
    assert not missing, f"RMSERVE_* variables read but not in docs/configuration.md: {missing}"


def test_the_model_layer_reads_its_variables_in_one_place():
    readers = {str(p.relative_to(ROOT)) for p in (ROOT / "service" / "engine").glob("*.py")
               if re.search(r"environ(\.get)?\(?\s*\[?[\"']RMSERVE_", p.read_text())}
    assert readers <= {"service/engine/settings.py"}, readers


def test_engine_settings_defaults_and_values():
    default = EngineSettings.from_env({})
    assert default.compile and not default.prepack and default.cache == Path.home() / ".cache" / "rmserve"
    s = EngineSettings.from_env({"RMSERVE_CACHE": "/c", "RMSERVE_COMPILE": "0", "RMSERVE_PREPACK": "1"})
    assert (s.cache, s.compile, s.prepack) == (Path("/c"), False, True)
