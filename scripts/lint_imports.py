"""Check the import-layer contracts (pyproject.toml [tool.importlinter]) with import-linter.

import-linter walks a package's directory, but rmserve's subpackages live in
several top-level folders joined only by setuptools' package-dir map (an
editable install resolves them through an import hook it cannot walk). So the
package is staged as installed — every mapped folder's .py files copied under
one `rmserve/` tree in a temporary directory — and lint-imports runs on that.

    python scripts/lint_imports.py            # exit status of lint-imports
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def stage(dest: Path, root: Path = ROOT) -> Path:
    """Copy the package as setuptools maps it into `dest`; returns `dest`."""
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in setup["packages"]:
        out = dest.joinpath(*package.split("."))
        out.mkdir(parents=True, exist_ok=True)
        for f in (root / setup["package-dir"][package]).glob("*.py"):
            shutil.copy2(f, out / f.name)
    return dest


def lint(staged: Path, root: Path = ROOT) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(staged)}
    # run outside the checkout, so that nothing there shadows the staged copy
    return subprocess.run([str(exe), str(root / "pyproject.toml"), "--no-cache"], cwd=staged, env=env,
                          capture_output=True, text=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="rmserve-lint-") as tmp:
        proc = lint(stage(Path(tmp)))
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
