"""Throughput, MFU and memory, logged to accelerate's trackers and OUTPUT_DIR/metrics.jsonl."""

import contextlib
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
from accelerate.tracking import TensorBoardTracker
from tqdm.auto import tqdm

from utils.files import write_atomic

# Dense bf16/fp16 tensor-core peak FLOP/s per device (vendor datasheets, no sparsity). Matched as
# substrings of torch.cuda.get_device_name(), most specific first.
PEAK_FLOPS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("A10G", 70e12), ("A10", 125e12), ("A6000", 155e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
    ("V100", 125e12), ("T4", 65e12), ("MI300X", 1307e12), ("MI250X", 383e12),
]


def perplexity(loss):
    """exp(loss), or inf where exp overflows (a loss above ~709, e.g. a diverged or fp16 run)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def device_peak_flops(device, override=None):
    """Peak FLOP/s of one device, or None when unknown (a CPU, an unlisted GPU without --peak_flops)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


def peak_memory_gib(accelerator):
    """Peak memory of the busiest process: allocated GPU memory on CUDA, resident set size on CPU."""
    device = accelerator.device
    if device.type == "cuda":
        local = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # ru_maxrss is KiB on Linux, bytes on macOS
        local = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)
    return accelerator.gather(torch.tensor([local], device=device)).max().item()


def trackers(report_to, output_dir, run_name):
    """accelerate's `log_with` for --report_to. TensorBoard writes to OUTPUT_DIR/tensorboard/RUN_NAME;
    'all' means these two, not every tracker accelerate happens to find installed."""
    names = {"none": [], "all": ["tensorboard", "wandb"]}.get(report_to, [report_to])
    tensorboard_dir = os.path.join(output_dir, "tensorboard")
    return [TensorBoardTracker(run_name, tensorboard_dir) if name == "tensorboard" else name for name in names] or None


def tracker_init_kwargs(output_dir, run_name, env=os.environ):
    """wandb's run name and directory (OUTPUT_DIR/wandb whatever WANDB_DIR says). Without an API key or
    login wandb would prompt: it runs offline instead (`wandb sync OUTPUT_DIR/wandb/offline-run-*` uploads)."""
    wandb = {"name": run_name, "dir": os.path.abspath(output_dir)}
    if "WANDB_MODE" not in env and not env.get("WANDB_API_KEY") and not _wandb_logged_in(env):
        wandb["mode"] = "offline"
    return {"wandb": wandb}


def _wandb_logged_in(env):
    netrc = os.path.expanduser(env.get("NETRC", "~/.netrc"))
    return os.path.isfile(netrc) and "api.wandb.ai" in Path(netrc).read_text()


def read_jsonl(path):
    """Every complete record; a run killed mid-write leaves a truncated last line, which is skipped."""
    records = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return records


class MetricsLog:
    """One JSON object per line in OUTPUT_DIR/metrics.jsonl, mirrored to accelerate's trackers.

    A resumed run keeps the records up to its checkpoint's step and drops the later ones, which
    it is about to log again; a fresh run starts an empty file. Loss-spike events are kept by the data
    they are about (a rollback goes back in steps, never in data): those up to the checkpoint's
    `keep_through_data_step`. Trackers get the step plus `offset`, the steps of data rollbacks skipped,
    so their steps only grow (wandb drops a step lower than one it has).
    """

    def __init__(self, accelerator, output_dir, keep_through_step=None, keep_through_data_step=None, offset=0):
        self.accelerator, self.offset = accelerator, offset
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if accelerator.is_main_process:
            data_step = keep_through_step if keep_through_data_step is None else keep_through_data_step
            kept = [r for r in read_jsonl(self.path)
                    if (_data_step(r) <= data_step if "event" in r else r.get("step", math.inf) <= keep_through_step)] \
                if keep_through_step is not None else []
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def event(self, step, **fields):
        """A spike's skip or rollback: a record of metrics.jsonl with an 'event' key (report.md lists them)."""
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **fields}) + "\n")

    def truncate(self, through_step):
        """Drop the records after `through_step` (a rollback trains those steps again), events kept."""
        if self.accelerator.is_main_process:
            kept = [r for r in read_jsonl(self.path) if r.get("step", math.inf) <= through_step or "event" in r]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, step, **values):
        values = {k: v for k, v in values.items() if v is not None}
        self.accelerator.log(values, step=step + self.offset)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")


def _data_step(event):
    """The last step of data an event is about: a skipped step's, or the last a rollback skipped."""
    return event.get("data_step") or event.get("data_steps_skipped", [0, event.get("step", 0)])[1]


class WindowTimer:
    """Training time and data-wait time per logging window, with evaluation and saving left out.
    Data wait is the time spent inside the loader's `next()`, nothing else."""

    def __init__(self):
        self.start()
        self.train_seconds = 0.0

    def start(self):
        self.window_start, self.data_wait = time.perf_counter(), 0.0

    def timed(self, iterable):
        """`iterable`'s items, the time each took to arrive counted as data wait."""
        iterator = iter(iterable)
        while True:
            start = time.perf_counter()
            with torch.profiler.record_function("data wait"):  # a part of a profiled step (utils/profiling.py)
                item = next(iterator, _END)
            self.data_wait += time.perf_counter() - start
            if item is _END:
                return
            yield item

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        yield
        self.window_start += time.perf_counter() - start

    def close_window(self):
        """(seconds, data-wait %) of the window since the last call; starts the next one."""
        now = time.perf_counter()
        elapsed, wait = now - self.window_start, self.data_wait
        self.train_seconds += elapsed
        self.window_start, self.data_wait = now, 0.0
        return elapsed, 100 * wait / elapsed


_END = object()


class TrainingMetrics:
    """The metrics that matter, measured and logged by one component: mean training loss, lr, grad
    norm, tokens/s, MFU, peak memory and data wait, every `logging_steps` optimizer steps (and at
    the last), plus evaluations. Evaluation and saving run inside `paused()`: not training time."""

    def __init__(self, accelerator, output_dir, logging_steps, tokens_per_step, flops_per_token, peak_flops,
                 resumed_at=None, plain_lines=False, resumed_data_steps=None, loss_copies=1):
        self.accelerator, self.logging_steps, self.tokens_per_step = accelerator, logging_steps, tokens_per_step
        self.loss_copies = loss_copies  # processes that computed the same share of the loss (tensor parallel)
        self.plain_lines = plain_lines and accelerator.is_main_process  # one line per logging step, no bar
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.log = MetricsLog(accelerator, output_dir, keep_through_step=resumed_at,
                              keep_through_data_step=resumed_data_steps,
                              offset=(resumed_data_steps or 0) - (resumed_at or 0))
        self.timer = WindowTimer()
        self.loss_sum = torch.zeros((), device=accelerator.device)  # summed on device; read only when logging
        self.window_steps = self.run_steps = 0

    def start(self):
        """Training time starts now: set-up, tracker start and the first evaluation are not in it."""
        self.timer.start()

    def steps(self, loader, micro_batches):
        """The loader's batches grouped `micro_batches` at a time (one optimizer step), the wait for
        each batch counted as data wait. An epoch holds whole steps (utils/data.py TrainOrder)."""
        step = []
        for batch in self.timer.timed(loader):
            step.append(batch)
            if len(step) == micro_batches:
                yield step
                step = []
        if step:
            raise RuntimeError(f"the loader ended {len(step)} micro-batches into an optimizer step of {micro_batches}")

    def micro_batch_done(self, loss):
        """loss: this micro-batch's share of its step's loss (the step's: the sum over micro-batches and processes)."""
        self.loss_sum += loss.detach()

    def step_done(self, step, last_step, lr, grad_norm, predicted_tokens, **counters):
        """Count an optimizer step; at a logging step, log the window's means with lr, grad norm, the
        step's predicted tokens (all processes; a tensor, read only here) and `counters`, and return
        (mean loss, tokens/s), else None."""
        self.window_steps += 1
        self.run_steps += 1
        if step % self.logging_steps and step != last_step:
            return None
        accelerator = self.accelerator
        mean_loss = (accelerator.reduce(self.loss_sum, "sum") / (self.window_steps * self.loss_copies)).item()
        elapsed, data_wait_pct = self.timer.close_window()
        tokens_per_second = self.window_steps * self.tokens_per_step / elapsed
        mfu = self._mfu(tokens_per_second)
        self.log.log(step, loss=mean_loss, lr=lr, grad_norm=None if grad_norm is None else float(grad_norm),
                     tokens_per_second=tokens_per_second, mfu=mfu, peak_memory_gib=peak_memory_gib(accelerator),
                     data_wait_pct=data_wait_pct, predicted_tokens=int(predicted_tokens), **counters)
        if self.plain_lines:
            self._print_line(step, last_step, mean_loss, lr, tokens_per_second, elapsed / self.window_steps)
        self.loss_sum.zero_()
        self.window_steps = 0
        return mean_loss, tokens_per_second

    @staticmethod
    def _print_line(step, last_step, loss, lr, tokens_per_second, seconds_per_step):
        """What the progress bar shows, as one line a log file keeps (SLURM, nohup): ~100 bytes a logging step."""
        eta = round((last_step - step) * seconds_per_step)
        print(f"step {step}/{last_step} | loss {loss:.4f} | lr {lr:.3e} | {tokens_per_second:,.0f} tokens/s | "
              f"ETA {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}", flush=True)

    def spike(self, step, event):
        """An outlier step (utils/spikes.py), logged as an event and shown above the progress bar."""
        self.log.event(step, **event)
        if self.accelerator.is_main_process:
            tqdm.write(f"step {step}: loss spike, update {event['event']} (loss {event['step_loss']:.4f}, "
                       f"{event['loss_z']:.1f} sigma; grad norm {event['step_grad_norm'] or 0:.3g}, "
                       f"{event['grad_norm_z']:.1f} sigma)",
                       file=sys.stdout)

    def rolled_back(self, state, rolled):
        """A rollback (utils/checkpoint.py Checkpointer.rollback): steps after its checkpoint are trained
        again, so their records go; the event stays, at the step the run went back to. rolled None: there
        was no checkpoint from before the spike, its outliers were skipped and the run goes on."""
        if rolled is None:
            self.log.event(state.step, event="not_rolled_back", data_step=state.data_steps)
            if self.accelerator.is_main_process:
                tqdm.write(f"step {state.step}: sustained loss spike and no checkpoint from before it: its updates "
                           "were skipped, the run goes on (--checkpointing_steps lets it roll back)", file=sys.stdout)
            return
        self.log.truncate(rolled["to_step"])
        self.log.event(rolled["to_step"], event="rollback", **rolled)
        self.log.offset = state.data_steps - state.step  # trackers: their steps only grow
        self.loss_sum.zero_()
        self.window_steps = 0
        self.timer.close_window()
        if self.accelerator.is_main_process:
            first, last = rolled["data_steps_skipped"]
            tqdm.write(f"step {rolled['at_step']}: sustained loss spike (outliers at steps "
                       f"{', '.join(map(str, rolled['outliers']))}): rolled back to {rolled['checkpoint']}, skipping "
                       f"the data of {last - first + 1} steps", file=sys.stdout)

    def eval_done(self, step, eval_loss, by_source=None):
        """Log the validation loss, and each source's (eval_loss/NAME) in a mixture."""
        by_source = by_source or {}
        self.log.log(step, eval_loss=eval_loss, perplexity=perplexity(eval_loss),
                     **{f"eval_loss/{name}": loss for name, loss in by_source.items()})
        if self.accelerator.is_main_process:  # tqdm.write: above the progress bar, not through it
            each = "".join(f", {name} {loss:.4f}" for name, loss in by_source.items())
            tqdm.write(f"step {step}: eval loss {eval_loss:.4f}{each}, perplexity {perplexity(eval_loss):.1f}",
                       file=sys.stdout)

    def paused(self):
        return self.timer.paused()

    def summary(self):
        """For results.json: training time, mean tokens/s and MFU of this process's run (resumes excluded)."""
        seconds = self.timer.train_seconds
        tokens_per_second = self.run_steps * self.tokens_per_step / seconds if self.run_steps else None
        return dict(tokens_per_second=tokens_per_second, train_seconds=seconds,
                    mfu=self._mfu(tokens_per_second) if tokens_per_second else None)

    def _mfu(self, tokens_per_second):
        """Model FLOPs utilization of all processes together, or None when the peak is unknown (a CPU)."""
        if not self.peak_flops:
            return None
        return self.flops_per_token * tokens_per_second / (self.peak_flops * self.accelerator.num_processes)
