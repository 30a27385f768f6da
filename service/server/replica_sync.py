"""Replicas on one registry follow its ACTIVE pointer (`rmserve serve --registry-poll SECONDS`).

Replicas that share a registry directory (a shared volume, a mounted bucket) serve the
version its ACTIVE file names. Every `every_s` seconds the follower reads ACTIVE
(`Registry.pointer`); when it was written since the last look (ActivateModel with
propagate on any replica, Train with activate, an operator) and names a version other
than the one served, the follower activates it with `ServingState.activate`, the same
load-warm-swap as ActivateModel: requests in flight finish on the version they started
on, and the replica keeps serving meanwhile.

- A version that fails to load is logged (an error naming it and the cause), counted
  (`rmserve_model_activations{source="registry", result="failed"}`), shown by
  `rmserve_registry_out_of_sync` = 1, and the previous version keeps serving. It is not
  tried again until ACTIVE is written again (activating the same version again counts).
- ACTIVE naming a version whose directory is not there (yet: a copy to this replica's
  mount still on its way) is looked for again at each poll, a cheap stat, and logged once.
- A local-only ActivateModel (propagate=false) does not write ACTIVE, so the follower
  leaves that version serving until ACTIVE is next written.
- The pointer seen when the server starts is where it begins: the model it resolved
  at start (`--model`, else ACTIVE) is not replaced until ACTIVE changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from rmserve.service.engine.ensemble import MANIFEST
from rmserve.service.server.errors import NotFound, RMServeError
from rmserve.service.server.registry import Registry
from rmserve.service.server.state import ModelSlot, ServingState

log = logging.getLogger("rmserve.replica_sync")

Pointer = tuple[str, tuple[int, int]]


class RegistryFollower:
    def __init__(self, state: ServingState, registry: Registry, every_s: float):
        self.state = state
        self.registry = registry
        self.every_s = every_s
        # Read before the server resolves its model, so a write racing the start is seen as a change.
        self._seen: Pointer | None = self._read_quietly()
        self._missing: Pointer | None = None   # the pointer whose version was reported missing
        self._read_failed = False
        self._task: asyncio.Task | None = None

    def _read_quietly(self) -> Pointer | None:
        """ACTIVE as the server starts; None when it names a version not (yet) in the registry,
        which the server then cannot start on: followed once its directory appears."""
        try:
            pointer = self.registry.pointer()
            if pointer is not None and not (self.registry.path_for(pointer[0]) / MANIFEST).is_file():
                return None
            return pointer
        except (OSError, ValueError, RMServeError):  # unreadable, or a bad name (InvalidInput): as if absent
            return None

    def start(self) -> None:
        if self._task is None and self.every_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="rmserve-registry-follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.check()
            except Exception:  # the follower must outlive any surprise; the next poll tries again
                log.exception("registry %s: following ACTIVE failed; polling goes on", self.registry.root)

    async def check(self) -> None:
        """One look at ACTIVE, and an activation if it names a new version."""
        slot = self.state.slot
        if slot is None:  # the first model is still loading: compare once it serves
            return
        loop = asyncio.get_running_loop()
        try:
            pointer = await loop.run_in_executor(None, self.registry.pointer)
        except OSError as e:  # a shared volume gone for a moment: keep serving, say so once
            if not self._read_failed:
                log.warning("registry %s: cannot read ACTIVE (%s); still serving %s", self.registry.root, e,
                            slot.version)
            self._read_failed = True
            return
        self._read_failed = False
        if pointer is None:
            self.state.metrics.registry_out_of_sync.set(0)
            return
        version = pointer[0]
        if pointer == self._seen or self._in_sync(slot, version):
            self._seen = pointer
            self._show_sync(version)
            return
        try:
            target = await loop.run_in_executor(None, self.registry.get, version)
        except NotFound:
            if self._missing != pointer:
                log.warning("registry %s: ACTIVE names %r, which is not in the registry (yet); still serving %s, "
                            "looking again every %g s", self.registry.root, version, slot.version, self.every_s)
                self._missing = pointer
            self._show_sync(version)
            return
        except Exception as e:  # a bad name (InvalidInput), an unreadable manifest
            self._seen = pointer
            self._failed(version, e)
            return
        self._seen = pointer  # before loading: a failed load is not retried until ACTIVE is written again
        log.info("registry %s: ACTIVE now names %s; loading it (serving %s meanwhile)", self.registry.root,
                 version, slot.version)
        t0 = time.perf_counter()
        try:
            slot = await self.state.activate(target.path)
        except Exception as e:  # NotReady: the load failed and the previous version serves on
            self._failed(version, e)
            return
        if slot.version != version:
            log.warning("registry %s: %s's manifest names version %r; serving it as %r (a registry entry's "
                        "directory is normally named for its manifest's version)", self.registry.root, version,
                        slot.version, slot.version)
        self._show_sync(version)
        self.state.metrics.activation("registry", ok=True)
        log.info("registry %s: now serving %s (loaded and warmed in %.1f s)", self.registry.root, version,
                 time.perf_counter() - t0)

    def _failed(self, version: str, error: Exception) -> None:
        self._show_sync(version)
        self.state.metrics.activation("registry", ok=False)
        why = str(error)
        if "still serving" not in why and self.state.slot is not None:
            why += f"; still serving {self.state.slot.version}"
        log.error("registry %s: could not activate %s, which ACTIVE names: %s. Not tried again until ACTIVE is "
                  "written again (rmserve_registry_out_of_sync = 1)", self.registry.root, version, why)

    def _in_sync(self, slot: ModelSlot, version: str) -> bool:
        """Whether `slot` serves the registry entry named `version`: by its version, or by the
        directory it was loaded from (an entry copied in by hand may carry another version in
        its manifest than its directory's name)."""
        if slot.version == version:
            return True
        try:
            return Path(slot.model.source).resolve() == self.registry.path_for(version).resolve()
        except (AttributeError, OSError, ValueError, RMServeError):  # a bad name (InvalidInput), no source
            return False

    def _show_sync(self, version: str) -> None:
        slot = self.state.slot
        self.state.metrics.registry_out_of_sync.set(int(slot is not None and not self._in_sync(slot, version)))
