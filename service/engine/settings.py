"""The engine's environment knobs, read in one place.

Every `RMSERVE_*` variable the model layer reads is a field of `EngineSettings`; nothing else in
service/engine reads the environment for rmserve's own settings. They are read when they are
used (at model load and the first compile), never per batch, so a process (or a test) that
changes one sees it at its next load. The kernels' own knobs (RMSERVE_CPU_ATTENTION,
RMSERVE_KERNEL_MARCH, RMSERVE_KERNEL_CACHE) are read in rmserve.kernels, which may not import
this package. docs/configuration.md lists every RMSERVE_* knob of the project.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineSettings:
    cache: Path
    """RMSERVE_CACHE (default ~/.cache/rmserve): converted builtin backbones (backbones/), vLLM's
    layer-cut checkpoints (vllm-cut/); the server's registry and the trainer's feature cache
    default under it too."""

    compile: bool = True
    """RMSERVE_COMPILE (default 1; 0 turns it off): torch.compile the fused CPU MLP loops
    (engine/precision.py); off, the same functions run eagerly."""

    prepack: bool = False
    """RMSERVE_PREPACK (default 0; 1 asks for it): pack bf16 CPU weights into oneDNN's layout at
    load, where a probe shows it gives F.linear's bits (engine/precision.py)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EngineSettings:
        env = os.environ if env is None else env
        return cls(
            cache=Path(env.get("RMSERVE_CACHE") or Path.home() / ".cache" / "rmserve"),
            compile=env.get("RMSERVE_COMPILE", "1") != "0",
            prepack=env.get("RMSERVE_PREPACK", "0") == "1",
        )


def settings() -> EngineSettings:
    """The settings as the environment has them now (cheap: call at load time, not per batch)."""
    return EngineSettings.from_env()
