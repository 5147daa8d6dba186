"""Loss spikes, handled without a human: an outlier step is skipped, a sustained spike rolls back.

A step is an outlier when its training loss or its gradient norm is more than `sigma` standard
deviations above the mean of the last `window` steps, as OLMo-core's SkipStepOptimizer decides
(6 sigma over 128 steps; llm.c's -sl/-sg is the same z-score). Nothing is decided before half the
window is filled: the first steps of a run move too fast for a mean. An outlier's update is skipped:
the weights and the optimizer state stay as they were (the learning-rate schedule moves on, as for a
non-finite step).

A rollback needs the loss: when `rollback_outliers` loss outliers fall within `rollback_window` steps,
the spike is sustained, and train.py rolls back to the newest checkpoint from before its first one and
goes on with the data after the spike (utils/checkpoint.py Checkpointer.rollback), as PaLM's authors
did by hand (restart ~100 steps before, skip 200-500 batches). Loss outliers stay out of the loss
window, so a spike that lasts does not become the new normal. The gradient norm alone only skips:
early in training it swings 10x and back on clean data while the loss goes on falling (measured on
the tests' tiny model), and every norm enters its window, so a lasting shift of the norm (it rises as
the learning rate decays) becomes the new normal instead of skipping every step.

The inputs are the step's loss over every process and micro-batch and the all-reduced gradient norm,
so every process decides the same. One host read per optimizer step (never per micro-batch), of both
numbers at once; the non-finite check reads the same norm.
"""

import math
from collections import deque

import torch


class SpikeDetector:
    """Decides, after each optimizer step's backward and before its update, whether the step is an
    outlier; its state (the window and the recent outliers) goes into every checkpoint."""

    def __init__(self, sigma=6.0, window=128, rollback_outliers=3, rollback_window=16, can_skip=True):
        self.sigma, self.window, self.min_steps = sigma, window, max(2, window // 2)
        self.rollback_outliers, self.rollback_window = rollback_outliers, rollback_window
        self.can_skip = can_skip  # False under DeepSpeed: its engine has applied the update inside backward
        self.losses, self.norms = deque(maxlen=window), deque(maxlen=window)
        self.outliers = []  # steps of the loss outliers within the last rollback_window steps
        self.skipped = self.applied = 0  # outlier updates skipped, and (DeepSpeed) applied anyway

    def check(self, step, loss, grad_norm):
        """Step `step`'s loss (a tensor, summed over processes) and gradient norm (a tensor, a float or
        None): None for a normal step, else the event {'event', 'loss', 'grad_norm', 'loss_z', 'grad_norm_z'},
        whose 'event' is 'skipped' (update skipped) or 'applied' (it could not be: DeepSpeed)."""
        loss, norm = _host(loss, grad_norm)
        self.outliers = [s for s in self.outliers if s > step - self.rollback_window]
        if not math.isfinite(loss) or (norm is not None and not math.isfinite(norm)):
            return None  # utils/faults.py NonFiniteGuard's case; no window learns from it
        loss_z, norm_z = _z(self.losses, loss, self.min_steps), _z(self.norms, norm, self.min_steps)
        if norm is not None:
            self.norms.append(norm)
        if loss_z > self.sigma:
            self.outliers.append(step)
        else:
            self.losses.append(loss)
        if max(loss_z, norm_z) <= self.sigma:
            return None
        self.skipped += self.can_skip
        self.applied += not self.can_skip
        return dict(event="skipped" if self.can_skip else "applied", step_loss=loss, step_grad_norm=norm,
                    loss_z=round(loss_z, 2), grad_norm_z=round(norm_z, 2))

    @property
    def sustained(self):
        """Enough loss outliers close together: roll back."""
        return len(self.outliers) >= self.rollback_outliers

    @property
    def suspect(self):
        """A loss outlier within the last rollback_window steps: a spike may be starting, so a save now keeps
        every older checkpoint (the rollback may need one from before it)."""
        return bool(self.outliers)

    def state_dict(self):
        return dict(losses=list(self.losses), norms=list(self.norms), outliers=list(self.outliers),
                    skipped=self.skipped, applied=self.applied)

    def load_state_dict(self, state):
        state = state or {}
        self.losses = deque(state.get("losses", []), maxlen=self.window)
        self.norms = deque(state.get("norms", []), maxlen=self.window)
        self.outliers = list(state.get("outliers", []))
        self.skipped, self.applied = state.get("skipped", 0), state.get("applied", 0)


def _host(loss, grad_norm):
    """(loss, grad norm) as Python floats, in one device-to-host copy."""
    if hasattr(grad_norm, "full_tensor"):  # a DTensor (FSDP2): the norm is replicated
        grad_norm = grad_norm.full_tensor()
    if torch.is_tensor(grad_norm):
        loss, grad_norm = torch.stack([loss.detach().float().reshape(()), grad_norm.detach().float().reshape(())]
                                      ).tolist()
        return loss, grad_norm
    return float(loss), None if grad_norm is None else float(grad_norm)


def _z(values, x, min_values):
    """How many standard deviations `x` is above the mean of `values` (0 with fewer than `min_values`).
    The deviation has a floor of 0.1% of the mean, so a flat window does not call a rounding error a spike."""
    if x is None or len(values) < max(2, min_values):
        return 0.0
    mean = math.fsum(values) / len(values)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return (x - mean) / max(std, 1e-3 * abs(mean), 1e-12)
