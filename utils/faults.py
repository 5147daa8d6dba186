"""Faults a long run must survive: preemption signals and non-finite steps."""

import math
import os
import signal
import time
from datetime import timedelta

import torch

from utils.errors import UserError

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request after saving; run the same command to continue
EXIT_DIVERGED = 3


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps; the weights were left as they were before them."""

    exit_code = EXIT_DIVERGED


class StopSignal:
    """Turns SIGTERM / SIGINT into a request to stop after the current optimizer step.

    Launchers send SIGTERM more than once: SLURM's `--signal` reaches every process of the step,
    and torchrun's agent (under `accelerate launch`) forwards its own SIGTERM to the workers again,
    so every SIGTERM only (re)asks for the stop. A second Ctrl-C aborts at once.

    The processes agree on the stop without stalling the device: each step starts an all-reduce of
    the flags on a CPU (gloo) group in the background and reads the one started a step earlier, which
    has long finished. So all processes stop after the same step, one step after the first signal.
    Then `agreed_time_left` agrees on the least time any process has before it is killed.
    """

    def __init__(self, timeout_seconds=1800, env=os.environ):
        self.timeout = timedelta(seconds=timeout_seconds)  # --ddp_timeout, as the other groups (gloo's own: 30 min)
        end = float(env.get("JOB_END_TIME") or 0)
        self.job_end = end if end > time.time() else None  # one already past is a broken value, not a deadline
        self.grace = float(env.get("PREEMPT_GRACE_SECONDS") or 0) or None
        self.received, self.received_at, self._interrupts = None, None, 0
        self._group, self._pending = None, None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                raise KeyboardInterrupt  # Ctrl-C twice: abort without saving
        self.received = self.received or signal.Signals(signum).name
        self.received_at = self.received_at or time.time()

    def time_left(self):
        """Seconds before this process is killed: to the job's end (JOB_END_TIME, a Unix time that
        slurm/train.sbatch exports), or PREEMPT_GRACE_SECONDS after the signal (a cluster's preemption
        grace time); inf when neither is known (a run outside a scheduler)."""
        ends = [self.job_end] if self.job_end else []
        if self.received_at and self.grace:
            ends.append(self.received_at + self.grace)
        return min(ends, default=math.inf) - time.time()

    def agreed(self, accelerator):
        """True on every process, after the same step, once any process got a signal."""
        if accelerator.num_processes == 1:
            return self.received is not None
        if self._group is None:  # once; a collective call on every process
            self._group = torch.distributed.new_group(backend="gloo", timeout=self.timeout)
        stop = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()  # started a step ago: done by now, and it never touches the GPU stream
            stop = flag.item() > 0
        flag = torch.tensor([float(self.received is not None)])
        self._pending = (torch.distributed.all_reduce(flag, group=self._group, async_op=True), flag)
        return stop

    def agreed_time_left(self, accelerator):
        """Once the processes stop: the least time any of them has left, the same number on every process
        (one blocking all-reduce; the run is ending)."""
        if accelerator.num_processes == 1:
            return self.time_left()
        self.close()
        left = torch.tensor([min(self.time_left(), 1e15)], dtype=torch.float64)
        torch.distributed.all_reduce(left, op=torch.distributed.ReduceOp.MIN, group=self._group)
        return left.item()

    def close(self):
        """Finish the last background all-reduce (before the process group goes away)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


class NonFiniteGuard:
    """Skips optimizer steps whose gradient norm is inf/NaN, and stops after too many in a row.

    With fp16 loss scaling the scaler decides instead: torch's GradScaler skips a step with inf/NaN
    gradients itself and lowers its scale (it must see every step, or its next unscale_ fails), and
    DeepSpeed does the same inside its engine. Those skips calibrate the loss scale, mostly in the
    first steps of a run, and do not count as divergence, unless a GradScaler has already lowered
    its scale below 1: then the inf/NaN values are real. (DeepSpeed stops on its own at its
    min_loss_scale.)
    """

    def __init__(self, limit, loss_scaling=False, scaler=None):
        self.limit, self.consecutive, self.total, self.loss_scale_skips = limit, 0, 0, 0
        self.loss_scaling, self.scaler = loss_scaling, scaler

    def step(self, optimizer, grad_norm, skip=False):
        """At an accumulation boundary: optimizer.step() unless the update is non-finite, or `skip`
        (a loss spike's outlier, utils/spikes.py). Returns False for a step counted as non-finite
        (skipped; the weights are unchanged)."""
        if skip:
            if self.scaler is not None:  # clipping unscaled the gradients: the scaler's step must be closed
                self.scaler.update()
            return True
        if self.loss_scaling:
            optimizer.step()  # GradScaler: unscales, skips on inf/NaN, updates the scale
            if not optimizer.step_was_skipped:
                return True
            if self.limit and self.scaler is not None and self.scaler.get_scale() < 1:
                return False  # counted as non-finite (limit 0: the guard is off)
            self.loss_scale_skips += 1
            return True
        finite = self.is_finite(grad_norm)
        if finite:  # DeepSpeed has stepped inside backward already: there this only counts
            optimizer.step()
        return finite

    def is_finite(self, grad_norm):
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
