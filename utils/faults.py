"""Faults a long run must survive: preemption signals and non-finite steps."""

import math
import signal

import torch

from utils.config import UserError

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request after saving; run the same command to continue
EXIT_DIVERGED = 3


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps; the weights were left as they were before them."""


class StopSignal:
    """Turns SIGTERM / SIGINT into a request to stop after the current optimizer step.

    A second signal of the same kind falls back to the default action (Ctrl-C twice aborts)."""

    def __init__(self):
        self.received = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)

    def agreed(self, accelerator):
        """True on every process once any process got a signal (they may get it a step apart)."""
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor(float(self.received is not None), device=accelerator.device)
        return accelerator.reduce(flag, "sum").item() > 0


class NonFiniteGuard:
    """Counts optimizer steps whose gradient norm is inf/NaN, and stops after too many in a row."""

    def __init__(self, limit):
        self.limit, self.consecutive, self.total = limit, 0, 0

    def update_is_finite(self, grad_norm):
        """Reads the (already all-reduced) gradient norm, a tensor or DeepSpeed's float, once per
        optimizer step; with the guard off (limit 0) nothing is read and the host never waits."""
        return not self.limit or grad_norm is None or math.isfinite(float(grad_norm))

    def record(self, finite, step):
        if finite:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.limit:
            raise TrainingDiverged(f"stopped at step {step}: {self.consecutive} consecutive steps with non-finite "
                                   "loss or gradients (updates skipped, nothing saved from them): lower "
                                   "--learning_rate, check the data, or resume from the last checkpoint")
