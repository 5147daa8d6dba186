"""When a run is slow: a torch.profiler trace of chosen steps and where their time went; CUDA memory
snapshots of chosen steps and of an out-of-memory error.

`--profile_steps A:B` records optimizer steps A to B (at most MAX_STEPS) on the ranks of
`--profile_ranks` (0 by default) into OUTPUT_DIR/profile/steps{A}-{B}_rank{R}.pt.trace.json.gz, a
gzipped Chrome trace (CPU and CUDA activities, shapes, memory) that Perfetto (ui.perfetto.dev),
chrome://tracing and TensorBoard's profiler plugin (`tensorboard --logdir OUTPUT_DIR/profile`) open. Each step is an annotation `step N`; its parts
are the annotations train.py and utils/metrics.py put on them (REGIONS). The breakdown of a step (data
wait, forward, backward, optimizer, communication, other) is read back from that trace: communication
is the collectives on the training thread, taken out of the part they ran in; other is what is left of
the step (the schedule, logging, the spike check). On a GPU the profiled steps wait for the device at
the end of each part, so each part's time is its device time (they run a little slower than the rest).

`--memory_snapshot` (CUDA) records every allocation from the start, with its stack, and writes
OUTPUT_DIR/profile/memory_snapshot_rank{R}_step{B}.pickle after the profiled steps; an out-of-memory
error writes memory_snapshot_rank{R}_oom.pickle (with the history when the flag is on, the live
blocks without it) and says where. Open them at https://pytorch.org/memory_viz.
"""

import contextlib
import gzip
import json
import os
import pickle
import re
import sys

import torch

MAX_STEPS = 10  # a trace of more steps grows past what Perfetto opens comfortably (~100 MB per step at 8B)
REGIONS = ("data wait", "forward", "backward", "optimizer")
_COMMUNICATION = re.compile(r"all_?reduce|all_?gather|reduce_?scatter|broadcast|all_?to_?all|nccl|gloo|c10d::",
                            re.IGNORECASE)
_HISTORY_ENTRIES = 100_000


def profile_dir(output_dir):
    return os.path.join(output_dir, "profile")


class StepProfiler:
    """Owns the trace of the chosen steps and the memory snapshots: train.py tells it when a step's data
    is about to be read (`steps`) and when the step is done (`step_done`); it decides the rest."""

    def __init__(self, steps, ranks, accelerator, output_dir, memory_snapshot=False):
        self.first, self.last = steps or (None, None)
        self.rank, self.output_dir = accelerator.process_index, output_dir
        self.active = steps is not None and (ranks is None or self.rank in ranks)
        self.cuda = accelerator.device.type == "cuda"
        self._profiler, self._step, self._current = None, None, None
        self.memory_history = memory_snapshot and self.cuda
        if self.cuda:  # recording starts now, before any snapshot is taken (else it is empty)
            if self.memory_history:
                torch.cuda.memory._record_memory_history(max_entries=_HISTORY_ENTRIES)
            torch._C._cuda_attach_out_of_memory_observer(self._out_of_memory)

    def steps(self, steps, done):
        """The loop's steps (metrics.steps), step `done` + 1 first; each profiled one opens its annotation
        before its data is read, so data wait is in it."""
        self._step = done
        iterator = iter(steps)
        while True:
            step = self._step + 1
            if self.active and step == self.first and self._profiler is None:
                self._start()
            if self._profiler is not None:
                self._current = torch.profiler.record_function(f"step {step}")
                self._current.__enter__()
            try:
                yield next(iterator)
            except StopIteration:
                self._close_step()
                return

    def step_done(self, step):
        """After the optimizer step `step`: closes its annotation; after the last profiled step, writes
        the trace, its breakdown and (--memory_snapshot) the memory snapshot."""
        self._step = step
        if self._profiler is None:
            return
        self._sync()
        self._close_step()
        if step >= self.last:
            self._finish()

    def rolled_back(self, step):
        """A rollback (utils/spikes.py) went back to `step`: a trace in progress is dropped (its steps are
        trained again; profiling them twice would outgrow MAX_STEPS), the step count follows."""
        self._step = step
        if self._profiler is not None:
            self._close_step()
            self._profiler.stop()
            self._profiler = None
            print(f"profile of steps {self.first}-{self.last} dropped on rank {self.rank}: a rollback to step {step}",
                  flush=True)

    def region(self, name):
        """A part of a step (REGIONS): an annotation in a profiled step (the device waited for at its end on
        a GPU), nothing otherwise."""
        if self._profiler is None:
            return contextlib.nullcontext()
        return _Region(name, self._sync)

    def _start(self):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
        self._profiler.start()

    def _close_step(self):
        if self._current is not None:
            self._current.__exit__(None, None, None)
            self._current = None

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def _finish(self):
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        os.makedirs(profile_dir(self.output_dir), exist_ok=True)
        path = os.path.join(profile_dir(self.output_dir), f"steps{self.first}-{self.last}_rank{self.rank}.pt.trace.json.gz")
        profiler.export_chrome_trace(path)
        parts = breakdown(read_trace(path))
        with open(os.path.join(profile_dir(self.output_dir), f"breakdown_rank{self.rank}.json"), "w") as f:
            json.dump(dict(steps=[self.first, self.last], trace=os.path.basename(path), **parts), f, indent=2)
        print(f"profile of steps {self.first}-{self.last} on rank {self.rank}: {path} (open it at ui.perfetto.dev)",
              flush=True)
        if self.memory_history:
            self._write_snapshot(f"step{self.last}")

    def _write_snapshot(self, label):
        os.makedirs(profile_dir(self.output_dir), exist_ok=True)
        path = os.path.join(profile_dir(self.output_dir), f"memory_snapshot_rank{self.rank}_{label}.pickle")
        with open(path, "wb") as f:
            pickle.dump(torch.cuda.memory._snapshot(), f)
        return path

    def _out_of_memory(self, device, alloc, device_alloc, device_free):
        path = self._write_snapshot("oom")
        print(f"out of memory on rank {self.rank} (device {device}, {alloc / 2**30:.2f} GiB asked, "
              f"{device_free / 2**30:.2f} GiB free): memory snapshot in {path}; drag it onto "
              "https://pytorch.org/memory_viz" + ("" if self.memory_history else
                                                   " (--memory_snapshot adds each block's stack)"),
              file=sys.stderr, flush=True)


class _Region(torch.profiler.record_function):
    def __init__(self, name, sync):
        super().__init__(name)
        self._sync = sync

    def __exit__(self, *exc):
        self._sync()
        return super().__exit__(*exc)


def parse_steps(text):
    """--profile_steps 'A:B' (or 'A'): (A, B), steps counted from 1, at most MAX_STEPS of them."""
    try:
        first, _, last = text.partition(":")
        first, last = int(first), int(last or first)
    except ValueError:
        first = last = None
    if first is None or not 1 <= first <= last:
        raise ValueError(f"--profile_steps {text!r} is not A:B with 1 <= A <= B (optimizer steps, e.g. 10:12)")
    if last - first + 1 > MAX_STEPS:
        raise ValueError(f"--profile_steps {text} holds {last - first + 1} steps: profile at most {MAX_STEPS} "
                         "(a trace grows by every step)")
    return first, last


def read_trace(path):
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        return json.load(f)


def breakdown(trace):
    """Seconds per profiled step, on average, by part: {'count', 'step_seconds', 'parts': {name: seconds}},
    the parts (REGIONS, communication, other) adding up to the step. Read from the training thread of a
    Chrome trace that this module wrote."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    annotations = [e for e in events if e.get("cat") == "user_annotation"]  # the CPU's, not the GPU's copies
    forward = [_interval(e) for e in annotations if e["name"] == "forward"]
    steps = [e for e in annotations if re.fullmatch(r"step \d+", e["name"])  # one that trained: not the empty
             and any(_union(forward, _interval(e)))]  # one an epoch's end opens before its loader stops
    if not steps:
        return dict(count=0, step_seconds=None, parts={})
    thread = (steps[0]["pid"], steps[0]["tid"])
    mine = [e for e in events if (e["pid"], e["tid"]) == thread]
    collectives = [_interval(e) for e in mine if e.get("cat") != "user_annotation" and _COMMUNICATION.search(e["name"])]
    regions = {name: [_interval(e) for e in mine if e["name"] == name and e.get("cat") == "user_annotation"]
               for name in REGIONS}
    totals = {name: 0.0 for name in (*REGIONS, "communication", "other")}
    for step in steps:
        window = _interval(step)
        communication = _union(collectives, window)
        taken = _length(communication)
        totals["communication"] += taken
        for name in REGIONS:
            spans = _union(regions[name], window)
            seconds = _length(spans) - _length(_intersect(spans, communication))
            totals[name] += seconds
            taken += seconds
        totals["other"] += step["dur"] - taken
    n = len(steps)
    return dict(count=n, step_seconds=sum(s["dur"] for s in steps) / n / 1e6,
                parts={name: max(total, 0.0) / n / 1e6 for name, total in totals.items()})


def _interval(event):
    return event["ts"], event["ts"] + event["dur"]


def _union(intervals, window):
    """Sorted disjoint intervals covering `intervals` cut to `window`."""
    merged = []
    for start, end in sorted((max(s, window[0]), min(e, window[1])) for s, e in intervals):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _intersect(a, b):
    return [(max(s1, s2), min(e1, e2)) for s1, e1 in a for s2, e2 in b if min(e1, e2) > max(s1, s2)]


def _length(intervals):
    return sum(end - start for start, end in intervals)
