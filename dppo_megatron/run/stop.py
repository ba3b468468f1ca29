"""A clean stop asked from outside: SIGTERM / SIGUSR1 (SLURM's warning before the time limit,
preemption) or a STOP file in the run directory ask for a checkpoint at the end of the current
step, then a clean exit."""

from __future__ import annotations

import signal
from pathlib import Path

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, stop_file: Path | None, group):
        """`stop_file`: watched on the rank that passes one; `group`: a gloo group of all ranks."""
        self.stop_file, self.group = stop_file, group
        self.signal = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._caught)

    def _caught(self, signum, frame) -> None:
        self.signal = signum

    def agreed(self) -> bool:
        """True on every rank if a stop was asked of any (signals may reach only some ranks). A
        collective."""
        asked = self.signal is not None or (self.stop_file is not None and self.stop_file.exists())
        value = torch.tensor([1.0 if asked else 0.0])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())

    def clear(self) -> None:
        if self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)
