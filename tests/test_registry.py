"""The registry's listing: complete versions only, oldest first, and a NotFound that names them
without reading any manifest (a follower meets it every poll while ACTIVE runs ahead of a copy)."""

from __future__ import annotations

import os

import pytest

from rmserve.service.server.errors import NotFound
from rmserve.service.server.registry import KNOWN_SHOWN, Registry


def _version(root, name: str, mtime: float, manifest: bytes = b"not json: never read here") -> None:
    (root / name).mkdir()
    (root / name / "manifest.json").write_bytes(manifest)
    os.utime(root / name / "manifest.json", (mtime, mtime))


def test_names_are_complete_versions_oldest_first(tmp_path):
    reg = Registry(tmp_path)
    for name, mtime in (("v3", 3), ("v1", 1), ("v2", 2)):   # created out of name order
        _version(tmp_path, name, 1_000_000 + mtime)
    (tmp_path / ".staging-v4").mkdir()                       # a version still being written
    (tmp_path / ".staging-v4" / "manifest.json").write_text("{}")
    (tmp_path / "v5").mkdir()                                # a directory without a manifest
    (tmp_path / "odd name").mkdir()                          # not a version name
    (tmp_path / "odd name" / "manifest.json").write_text("{}")
    reg.set_active("v2")
    assert reg.names() == ["v1", "v2", "v3"]


def test_not_found_names_the_newest_versions_without_reading_manifests(tmp_path):
    reg = Registry(tmp_path)
    n = KNOWN_SHOWN + 3
    for i in range(n):
        _version(tmp_path, f"v{i:02d}", 1_000_000 + i)       # every manifest is unreadable JSON
    with pytest.raises(NotFound) as e:
        reg.get("v99")
    msg = str(e.value)
    newest = [f"v{i:02d}" for i in range(n - KNOWN_SHOWN, n)]
    assert f"newest {KNOWN_SHOWN} of {n}" in msg and msg.endswith(", ".join(newest) + ")")
    assert "v00" not in msg


def test_an_empty_registry_says_none(tmp_path):
    with pytest.raises(NotFound, match=r"known: none"):
        Registry(tmp_path).get("v1")
