"""The protos: the committed stubs are what scripts/gen_protos.sh generates now; buf's lint and
breaking-change check (buf.yaml, docs/protos.md) pass and can fail; the package's folders."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lines that stamp the generator's version: a grpcio-tools patch release rewrites them and nothing
# else, and the stub's own import-time check already refuses a grpcio older than its stamp.
_STAMPS = re.compile(r"^(GRPC_GENERATED_VERSION = .*|# Protobuf Python Version: .*|\s+\d+,\s*$|\s+'',\s*$)", re.M)


def _content(path: Path) -> str:
    return _STAMPS.sub("<stamp>", path.read_text())


def test_committed_stubs_are_fresh(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}  # the interpreter running the tests has grpc_tools
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True, cwd=ROOT, env=env)
    committed = ROOT / "protos" / "rmserve" / "v1"
    fresh = tmp_path / "rmserve" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(f"{p}{s}" for p in ("admin", "label", "reward") for s in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
    stale = [n for n in names if _content(fresh / n) != _content(committed / n)]
    assert not stale, f"stale generated stubs {stale}: run scripts/gen_protos.sh and commit"


def _buf() -> str:
    """The buf CLI of the dev extra (buf-bin), beside this interpreter or on PATH."""
    beside = Path(sys.executable).with_name("buf")
    found = str(beside) if beside.exists() else shutil.which("buf")
    if found is None:
        pytest.skip("buf is not installed (the dev extra's buf-bin)")
    return found


def _run_buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([_buf(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_buf_lint_and_the_breaking_check_against_the_released_api_pass():
    lint = _run_buf("lint")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    breaking = _run_buf("breaking", "--against", "protos/released-api.yaml")
    assert breaking.returncode == 0, breaking.stdout + breaking.stderr


def test_the_lint_exceptions_are_exactly_the_three_rpcs_buf_yaml_names():
    """buf.yaml turns RPC_RESPONSE_STANDARD_NAME off for two whole files; without that, exactly the
    three RPCs it lists fail the rule, so a new RPC in those files is still held to it."""
    import yaml

    config = yaml.safe_load((ROOT / "buf.yaml").read_text())
    del config["lint"]["ignore_only"]
    out = _run_buf("lint", "--error-format", "json", "--config", json.dumps(config))
    found = {(e["path"], e["type"], re.search(r'RPC response type "(\w+)"', e["message"]).group(1))
             for e in map(json.loads, out.stdout.splitlines())}
    assert found == {
        ("protos/rmserve/v1/admin.proto", "RPC_RESPONSE_STANDARD_NAME", "TrainProgress"),
        ("protos/rmserve/v1/reward.proto", "RPC_RESPONSE_STANDARD_NAME", "ModelInfo"),
        ("protos/rmserve/v1/reward.proto", "RPC_RESPONSE_STANDARD_NAME", "RunStatus"),
    }, out.stdout + out.stderr


@pytest.mark.parametrize(("old", "new", "named"), [
    ("  float reward = 2; ", "  reserved 2; ", "reward"),                     # a result field dropped
    ("  string run_id = 1;                        //", "  string run_id = 11; //", "run_id"),  # renumbered
    ("rpc Compare(CompareRequest)", "rpc Rank(CompareRequest)", "Compare"),   # an RPC renamed
])
def test_the_breaking_check_fails_on_a_planted_break(tmp_path, old, new, named):
    shutil.copytree(ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    proto = tmp_path / "protos" / "rmserve" / "v1" / "reward.proto"
    text = proto.read_text()
    assert text.count(old) == 1, old
    proto.write_text(text.replace(old, new))
    out = _run_buf("breaking", "--against", str(ROOT / "protos" / "released-api.yaml"), cwd=tmp_path)
    assert out.returncode != 0 and f'"{named}"' in out.stdout, out.stdout + out.stderr


def test_bare_folder_names_are_not_importable_from_an_install(tmp_path):
    """Outside the checkout (cwd elsewhere), only `rmserve.*` resolves to rmserve's folders (another
    distribution may own a bare name: transformers installs Hugging Face's `kernels`)."""
    code = (
        "import importlib.util, rmserve.service, rmserve.client, rmserve.kernels, rmserve.training\n"
        "specs = {b: importlib.util.find_spec(b) for b in ('service', 'client', 'kernels', 'training')}\n"
        f"print([b for b, s in specs.items() if s and str(s.origin or '').startswith({str(ROOT)!r} + '/' + b)])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_checkout_root_on_sys_path_does_not_shadow_hugging_faces_kernels():
    """`python -m pytest` (or `python -m rmserve...`) run from the checkout puts its root first on
    sys.path, where the `kernels/` folder is found as a top-level `kernels`. transformers imports
    Hugging Face's `kernels` when that is installed, and must get it (kernels/__init__.py hands the
    name over), while rmserve's kernels stay `rmserve.kernels`."""
    import importlib.metadata

    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed: nothing to shadow")
    code = (
        "import os, sys\n"
        "import transformers.integrations.hub_kernels, kernels, rmserve.kernels\n"
        "print(os.path.realpath(sys.path[0] or '.'), kernels.__file__, rmserve.kernels.__file__, "
        "hasattr(kernels, 'get_kernel'), sep='\\n')"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}  # the root stays on sys.path
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    first, hf, ours, has_get_kernel = out.stdout.split()
    assert Path(first) == ROOT.resolve()
    assert not Path(hf).resolve().is_relative_to(ROOT.resolve() / "kernels") and has_get_kernel == "True", hf
    assert Path(ours).resolve() == ROOT.resolve() / "kernels" / "__init__.py"
    # and in this process, which `python -m pytest` started with the root first on sys.path
    import transformers.integrations.hub_kernels  # noqa: F401  (imports `kernels`, as it is installed)

    hf = sys.modules["kernels"].__file__
    assert not Path(hf).resolve().is_relative_to(ROOT.resolve() / "kernels"), hf


def test_the_wheel_ships_every_package_the_type_markers_and_the_default_model(tmp_path):
    """What `pip install rmserve` gets: each mapped folder's modules (the model layer
    included), py.typed markers, the default model's files; no bare top-level names."""
    import shutil
    import zipfile

    root = Path(__file__).resolve().parents[1]
    # build from a copy: setuptools writes build/ and *.egg-info into the source tree
    src = tmp_path / "src"
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("rmserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in (("service/engine", "rmserve/service/engine"), ("service", "rmserve/service"),
                            ("service/server", "rmserve/service/server"), ("service/data", "rmserve/service/data"),
                            ("training", "rmserve/training"), ("client", "rmserve/client"),
                            ("kernels", "rmserve/kernels")):
        for f in (root / folder).glob("*.py"):
            assert f"{package}/{f.name}" in names, f"{folder}/{f.name} is not in the wheel"
    for marker in ("rmserve/py.typed", "rmserve/client/py.typed", "rmserve/service/py.typed"):
        assert marker in names
    assert "rmserve/service/default_model/manifest.json" in names
    assert not [n for n in names if n.split("/")[0] in {"service", "client", "kernels", "training"}]
