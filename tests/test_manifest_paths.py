"""Paths a caller or a model names cannot escape their root: training reads only under
`--data-root` (symlinks and `..` included), and a manifest's member files stay inside
the ensemble directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import pytest
import torch

from rmserve.client import RewardClient, RewardServiceError
from rmserve.service.engine.ensemble import MemberSpec, load_member, read_manifest
from rmserve.service.engine.errors import EnsembleFormatError

# -- the ensemble directory -------------------------------------------------------------------


@pytest.fixture
def ensemble(tiny_ensemble, tmp_path) -> Path:
    """A private copy of the tiny ensemble (the session's is shared), plus a tensor file outside it."""
    d = tmp_path / "ens"
    shutil.copytree(tiny_ensemble, d)
    shutil.copy(d / "member0" / "heads.safetensors", tmp_path / "outside.safetensors")
    return d


def edit_manifest(d: Path, **member) -> None:
    raw = json.loads((d / "manifest.json").read_text())
    raw["members"][0].update(member)
    (d / "manifest.json").write_text(json.dumps(raw))


@pytest.mark.parametrize(("field", "name"), [
    ("heads", "../../outside.safetensors"),
    ("delta", "../../outside.safetensors"),
    ("uncertainty", "../../outside.safetensors"),
    ("heads", "ABSOLUTE"),
    ("name", "../elsewhere"),
    ("name", "/tmp"),
])
def test_member_files_outside_the_directory_are_refused(ensemble, field, name):
    if name == "ABSOLUTE":
        name = str(ensemble.parent / "outside.safetensors")
    if field == "name" and not name.startswith("/"):
        shutil.copytree(ensemble / "member0", ensemble.parent / "elsewhere")  # it exists, and is still refused
    edit_manifest(ensemble, **{field: name})
    spec = read_manifest(ensemble).members[0]
    with pytest.raises(EnsembleFormatError, match="outside the ensemble directory") as err:
        load_member(ensemble, spec)
    shown = "heads.safetensors" if field == "name" else name
    assert repr(shown) in str(err.value)


@pytest.mark.parametrize("field", ["heads", "uncertainty"])
def test_a_symlink_out_of_the_directory_is_refused(ensemble, field):
    member = ensemble / "member0"
    name = {"heads": "heads.safetensors", "uncertainty": "uncertainty.safetensors"}[field]
    (member / name).unlink()
    (member / name).symlink_to(ensemble.parent / "outside.safetensors")
    with pytest.raises(EnsembleFormatError, match=f"{field} file '{name}' resolves to .*outside"):
        load_member(ensemble, read_manifest(ensemble).members[0])


def test_a_symlinked_member_directory_out_of_the_directory_is_refused(ensemble):
    shutil.move(ensemble / "member0", ensemble.parent / "real-member0")
    (ensemble / "member0").symlink_to(ensemble.parent / "real-member0", target_is_directory=True)
    with pytest.raises(EnsembleFormatError, match="outside the ensemble directory"):
        load_member(ensemble, read_manifest(ensemble).members[0])


def test_paths_that_stay_inside_are_fine(ensemble):
    """`..` and symlinks are allowed while they resolve inside: shared files between members."""
    (ensemble / "shared").mkdir()
    shutil.move(ensemble / "member0" / "heads.safetensors", ensemble / "shared" / "heads.safetensors")
    (ensemble / "member0" / "heads.safetensors").symlink_to(ensemble / "shared" / "heads.safetensors")
    t = load_member(ensemble, read_manifest(ensemble).members[0])
    edit_manifest(ensemble, heads="../shared/heads.safetensors")
    u = load_member(ensemble, read_manifest(ensemble).members[0])
    assert torch.equal(t.weight, u.weight) and t.unc_factor is not None


def test_the_whole_load_refuses_and_the_backbone_may_be_absolute(ensemble):
    from rmserve.service.engine.model import load_model

    edit_manifest(ensemble, backbone=str(ensemble / "backbone"))  # absolute: allowed, as are builtin: names
    assert load_model(ensemble, dtype="float32").num_heads == 4
    edit_manifest(ensemble, uncertainty="../../outside.safetensors")
    with pytest.raises(EnsembleFormatError, match=r"uncertainty file '\.\./\.\./outside\.safetensors'"):
        load_model(ensemble, dtype="float32")


def test_saving_cannot_write_outside_either(tmp_path):
    from rmserve.service.engine.ensemble import MemberTensors, save_member

    spec = MemberSpec(name="m", backbone="b", heads="../../escaped.safetensors")
    with pytest.raises(EnsembleFormatError, match="outside"):
        save_member(tmp_path / "ens", spec, MemberTensors(weight=torch.zeros(1, 2), bias=torch.zeros(1)))
    assert not (tmp_path / "escaped.safetensors").exists()


# -- --data-root --------------------------------------------------------------------------------


@pytest.fixture
def rooted(tiny_ensemble, server_factory, tmp_path):
    """A server whose data root holds a symlink to a file outside it, and a sibling dir sharing its prefix."""
    data, outside, sibling = tmp_path / "data", tmp_path / "outside", tmp_path / "data-evil"
    for d in (data, outside, sibling):
        d.mkdir()
    row = json.dumps({"prompt": "p", "chosen": "thanks", "rejected": "no"}) + "\n"
    for f in (data / "train.jsonl", outside / "secret.jsonl", sibling / "train.jsonl"):
        f.write_text(row * 8)
    (data / "link.jsonl").symlink_to(outside / "secret.jsonl")
    (data / "linkdir").symlink_to(outside, target_is_directory=True)
    server = server_factory(tiny_ensemble, registry=str(tmp_path / "registry"), data_roots=[str(data)])
    return server, data, outside


def test_training_data_cannot_escape_the_data_root(rooted):
    server, data, _ = rooted
    escapes = [
        str(data / "link.jsonl"),                              # a symlink inside pointing out
        str(data / "linkdir" / "secret.jsonl"),                # through a symlinked directory
        str(data / ".." / "outside" / "secret.jsonl"),         # `..`
        f"{data}/../data/../outside/secret.jsonl",
        str(data.parent / "data-evil" / "train.jsonl"),        # a sibling whose name starts like the root
    ]
    with RewardClient(server.address, timeout=60) as c:
        for path in escapes:
            for kw in ({"data_path": path}, {"data_path": str(data / "train.jsonl"), "dev_path": path}):
                with pytest.raises(RewardServiceError) as err:
                    list(c.train(**kw))
                assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, kw
                assert "outside the server's data roots" in str(err.value), kw


def test_options_json_cannot_point_the_feature_cache_elsewhere(rooted):
    server, data, outside = rooted
    with RewardClient(server.address, timeout=60) as c, pytest.raises(RewardServiceError) as err:
        list(c.train(str(data / "train.jsonl"), options={"feature_cache": str(outside)}))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "feature_cache" in str(err.value)


def test_readable_returns_the_resolved_path(rooted, tmp_path):
    """The job gets the resolved path, so swapping a symlink after the check changes nothing."""
    server, data, _ = rooted
    (data / "inner.jsonl").symlink_to(data / "train.jsonl")
    assert server.server.admin._readable(str(data / "inner.jsonl"), "data_path") == str((data / "train.jsonl").resolve())



def test_written_files_are_readable_as_open_would_make_them(tmp_path):
    """Atomic writes go through mkstemp (0600); the result gets the umask's mode, so a shared
    registry or a non-root container user can read what another process wrote."""
    import os

    import torch

    from rmserve.service.engine.ensemble import atomic_save_tensors, atomic_write_bytes

    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_bytes(tmp_path / "a.json", b"{}")
    atomic_save_tensors(tmp_path / "b.safetensors", {"x": torch.zeros(2)})
    for name in ("a.json", "b.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask
