"""The proxy behind a real rmserve server, scored the way a trainer scores it.

Every proxy score in the experiment goes through gRPC (`RewardClient`) to a
`BackgroundServer` started in this process: the run monitor then sees exactly
what it would see from a PPO/GRPO trainer, including its own step bookkeeping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Message = dict[str, str]


@dataclass
class ProxyScores:
    mean: np.ndarray      # [N] ensemble mean (normalised reward)
    std: np.ndarray       # [N] population std over heads (what the monitor averages)
    members: np.ndarray   # [N, K] per-head rewards

    @property
    def var(self) -> np.ndarray:
        return self.std ** 2

    @property
    def min(self) -> np.ndarray:
        return self.members.min(axis=1)

    def take(self, idx: Sequence[int] | np.ndarray) -> ProxyScores:
        idx = np.asarray(idx, dtype=np.int64)
        return ProxyScores(self.mean[idx], self.std[idx], self.members[idx])

    @staticmethod
    def concat(parts: Sequence[ProxyScores]) -> ProxyScores:
        return ProxyScores(np.concatenate([p.mean for p in parts]), np.concatenate([p.std for p in parts]),
                           np.concatenate([p.members for p in parts]))


class ProxyServer:
    """A `BackgroundServer` on a free port serving `model_dir`, with its run monitor
    configured by `monitor` (MonitorConfig fields; empty = the server's defaults)."""

    def __init__(self, model_dir: str | Path, monitor: dict[str, Any] | None = None):
        from rmserve.client import RewardClient
        from rmserve.service.server.background import BackgroundServer
        from rmserve.service.server.config import ServerConfig

        cfg = ServerConfig(model=str(model_dir), port=0, metrics_port=None, runs_file="",
                           monitor=dict(monitor or {}))
        self.server = BackgroundServer(cfg).start()
        self.client = RewardClient(self.server.address)
        self.client.wait_until_ready(120)

    def score_groups(self, groups: Sequence[tuple[Sequence[Message], Sequence[str]]], *,
                     run_id: str | None = None, step: int | None = None) -> list[ProxyScores]:
        """Per group (prompt messages, responses): the proxy's scores, through ScoreGroups
        (one prompt encoded once per group, as a GRPO trainer sends it)."""
        results = self.client.score_groups_many(
            [(list(p), list(rs)) for p, rs in groups], return_members=True, run_id=run_id, step=step, timeout=600,
        )
        out = []
        for res in results:
            out.append(ProxyScores(
                mean=np.array([r.reward for r in res], dtype=np.float64),
                std=np.array([r.std for r in res], dtype=np.float64),
                members=np.array([r.members for r in res], dtype=np.float64),
            ))
        return out

    def run_status(self, run_id: str) -> dict[str, Any]:
        """The monitor's verdict on `run_id`, as plain data for the report."""
        s = self.client.run_status(run_id)
        return {"alarm": s.alarm, "alarm_step": s.alarm_step, "reason": s.reason, "steps": s.steps,
                "reward_mean": s.reward_mean, "std_mean": s.std_mean}

    def model_info(self) -> dict[str, Any]:
        info = self.client.model_info()
        return {f: getattr(info, f) for f in ("name", "version", "num_heads", "backbone_layers", "dtype")
                if hasattr(info, f)}

    def close(self) -> None:
        self.client.close()
        self.server.stop()
