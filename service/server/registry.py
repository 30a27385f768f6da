"""Model registry: trained versions on disk, one directory each.

```
registry/
  v20261125-101500-3f2a/   an ensemble directory (manifest.json names the same version)
  v20261125-113000-9c1d/
  ACTIVE                   the version to serve after a restart (written atomically)
```

A version directory appears only once complete: the trainer writes into a
hidden staging directory and renames it into place. Activation itself lives in
the server (load, warm, swap); the registry only finds, lists and remembers.

Several replicas may share one registry directory (a shared volume, a mounted
bucket): ACTIVE is then the fleet's version. It is replaced by rename (temp file
+ fsync + os.replace), so a reader sees the old pointer or the new one, never a
half-written one, and it is written only after the version it names is complete.
Replicas follow it with service/server/replica_sync.py (docs/scaling.md).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from rmserve.service.engine.ensemble import MANIFEST, atomic_write_bytes, read_manifest
from rmserve.service.server.errors import InvalidInput, NotFound

_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ACTIVE = "ACTIVE"
KNOWN_SHOWN = 10   # versions a NotFound message names


@dataclass(frozen=True)
class ModelVersion:
    version: str
    path: Path
    name: str
    created: float
    report: dict          # train_report.json written next to the checkpoint, {} if none


class Registry:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def new_version(self, prefix: str = "v") -> str:
        return f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 0xFFFF:04x}"

    def path_for(self, version: str) -> Path:
        if not _VERSION.match(version):
            raise InvalidInput(f"model version {version!r} is not a valid name (letters, digits, '.', '_', '-')")
        return self.root / version

    def get(self, version: str) -> ModelVersion:
        path = self.path_for(version)
        if not (path / MANIFEST).is_file():
            # names only: a follower meets this every poll while ACTIVE runs ahead of a copy
            names = self.names()
            known = ", ".join(names[-KNOWN_SHOWN:]) or "none"
            more = f" (newest {KNOWN_SHOWN} of {len(names)})" if len(names) > KNOWN_SHOWN else ""
            raise NotFound(f"no model version {version!r} in the registry (known{more}: {known})")
        man = read_manifest(path)
        report_file = path / "train_report.json"
        report = json.loads(report_file.read_text()) if report_file.is_file() else {}
        return ModelVersion(version, path, man.name, (path / MANIFEST).stat().st_mtime, report)

    def names(self) -> list[str]:
        """Complete versions, oldest first, without reading their manifests."""
        found = []
        for p in self.root.iterdir():
            if _VERSION.match(p.name):  # not hidden staging directories, not odd names
                try:
                    found.append(((p / MANIFEST).stat().st_mtime, p.name))
                except (FileNotFoundError, NotADirectoryError):
                    continue  # ACTIVE, a stray file, a directory without a manifest
        return [name for _, name in sorted(found)]

    def list(self) -> list[ModelVersion]:
        return [self.get(name) for name in self.names()]

    def set_active(self, version: str) -> None:
        atomic_write_bytes(self.root / ACTIVE, (version + "\n").encode())

    def pointer(self) -> tuple[str, tuple[int, int]] | None:
        """ACTIVE as written, unchecked: (version, identity), None when there is none. The
        identity (inode, mtime) changes with every write, even of the same version, so a
        follower notices a version being activated again. Read through an open file, which on
        NFS revalidates (close-to-open) where a bare stat may answer from a stale cache."""
        try:
            with open(self.root / ACTIVE, "rb") as f:
                st = os.fstat(f.fileno())
                version = f.read(4096).decode("utf-8", "replace").strip()
        except FileNotFoundError:
            return None
        return version, (st.st_ino, st.st_mtime_ns)

    def active(self) -> str | None:
        f = self.root / ACTIVE
        if not f.is_file():
            return None
        version = f.read_text().strip()
        return version if (self.root / version / MANIFEST).is_file() else None
