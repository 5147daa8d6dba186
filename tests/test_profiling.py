"""--profile_steps: a torch.profiler trace of chosen steps per chosen rank, and where a step's time went;
CUDA memory snapshots (their plumbing here: this machine has no GPU)."""

import gzip
import json
import pickle

import pytest

from conftest import TINY, launch
from utils.config import parse_args
from utils.errors import UserError
from utils.profiling import MAX_STEPS, StepProfiler, breakdown, parse_steps

RUN = [*TINY, "--max_train_steps", 12, "--eval_steps", 1000, "--profile_steps", "5:7"]


def trace(path):
    with gzip.open(path, "rt") as f:
        return json.load(f)


def check_profile(out, rank):
    """The trace parses, holds steps 5-7 and nothing else as steps, shapes and memory; its breakdown adds up."""
    path = out / "profile" / f"steps5-7_rank{rank}.pt.trace.json.gz"
    assert path.stat().st_size < 20 * 2**20  # bounded: 3 steps of a tiny model
    events = trace(path)["traceEvents"]
    steps = sorted(e["name"] for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("step "))
    assert steps == ["step 5", "step 6", "step 7"]
    assert any(e.get("args", {}).get("Input Dims") for e in events if e.get("cat") == "cpu_op")  # shapes
    assert any(e.get("name") == "[memory]" for e in events)  # allocations
    parts = json.loads((out / "profile" / f"breakdown_rank{rank}.json").read_text())
    assert parts == {"steps": [5, 7], "trace": path.name, **breakdown(trace(path))}
    # The parts never overlap, so they add up to the step; 'other' is clipped at 0 only if they did
    assert sum(parts["parts"].values()) == pytest.approx(parts["step_seconds"], rel=0.01)
    assert all(parts["parts"][name] > 0 for name in ("data wait", "forward", "backward", "optimizer", "other"))
    assert parts["parts"]["forward"] + parts["parts"]["backward"] + parts["parts"]["optimizer"] > \
        0.5 * parts["step_seconds"]
    return parts


def test_profiled_steps_leave_a_trace_and_their_breakdown_in_the_report(corpus, tmp_path):
    out = tmp_path / "out"
    done = launch(["--train_file", corpus, "--output_dir", out, *RUN])
    parts = check_profile(out, 0)
    assert parts["parts"]["communication"] == 0  # one process
    assert "profile of steps 5-7 on rank 0" in done.stdout
    report = (out / "report.md").read_text()
    assert "## Profile" in report and "| forward |" in report and "steps5-7_rank0.pt.trace.json.gz" in report
    assert sorted(p.name for p in (out / "profile").iterdir()) == ["breakdown_rank0.json", "steps5-7_rank0.pt.trace.json.gz"]


@pytest.mark.distributed
@pytest.mark.parametrize("config", ["multi_cpu.yaml", "deepspeed_zero2.yaml"])
def test_every_chosen_rank_writes_its_own_trace_with_its_communication(config, corpus, tmp_path):
    out = tmp_path / "out"
    launch(["--train_file", corpus, "--output_dir", out, *RUN, "--profile_ranks", "all"], num_processes=2,
           config_file=config)
    for rank in (0, 1):
        assert check_profile(out, rank)["parts"]["communication"] > 0  # gloo's all-reduces on the training thread


@pytest.mark.parametrize("text, message", [("7:5", "is not A:B"), ("x", "is not A:B"), ("0:3", "is not A:B"),
                                           (f"1:{MAX_STEPS + 1}", f"profile at most {MAX_STEPS}")])
def test_bad_profile_steps_are_one_clear_error(text, message):
    with pytest.raises(UserError, match=message):
        parse_args(["--profile_steps", text])


def test_profile_flags_parse():
    args = parse_args(["--profile_steps", "10", "--profile_ranks", "0,8"])
    assert (args.profile_steps, args.profile_ranks) == ((10, 10), [0, 8])
    assert parse_args(["--profile_ranks", "all"]).profile_ranks is None
    assert parse_steps("3:12") == (3, 12)


class FakeAccelerator:
    process_index = 3

    class device:
        type = "cuda"


def test_an_out_of_memory_error_writes_a_memory_snapshot_and_says_where(tmp_path, monkeypatch, capsys):
    """What the CUDA out-of-memory observer does, with torch's CUDA calls stood in for: recording starts
    when the profiler is made (before any snapshot: an empty one is the known pitfall), the observer is
    attached, and an out-of-memory error writes the snapshot and one line saying how to view it."""
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda **kw: calls.append(("record", kw)))
    monkeypatch.setattr(torch._C, "_cuda_attach_out_of_memory_observer", lambda f: calls.append(("observer", f)),
                        raising=False)  # a CUDA build has it
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda: {"segments": ["..."], "device_traces": [[]]})
    profiler = StepProfiler(None, [0], FakeAccelerator, str(tmp_path), memory_snapshot=True)
    assert [c[0] for c in calls] == ["record", "observer"]
    calls[1][1](0, 3 * 2**30, 70 * 2**30, 2**30)  # what the allocator calls on an out-of-memory error
    path = tmp_path / "profile" / "memory_snapshot_rank3_oom.pickle"
    assert pickle.loads(path.read_bytes())["segments"] == ["..."]
    assert f"out of memory on rank 3 (device 0, 3.00 GiB asked, 1.00 GiB free): memory snapshot in {path}" in \
        capsys.readouterr().err
    assert profiler.memory_history


def test_the_breakdown_reads_the_cpu_annotations_of_steps_that_trained():
    """On a GPU kineto copies each annotation onto the GPU's timeline (gpu_user_annotation): counted once.
    An epoch's end opens a step annotation that trains nothing: not a step."""
    def event(name, ts, dur, cat="user_annotation", tid=1):
        return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "pid": 1, "tid": tid}
    trace = {"traceEvents": [
        event("step 5", 0, 100), event("data wait", 0, 10), event("forward", 10, 30), event("backward", 40, 40),
        event("nccl:all_reduce", 60, 10, cat="cpu_op"), event("optimizer", 80, 15),
        event("step 5", 0, 100, cat="gpu_user_annotation", tid=7), event("forward", 10, 30, cat="gpu_user_annotation", tid=7),
        event("step 6", 200, 1)]}  # the empty one
    parts = breakdown(trace)
    assert parts["count"] == 1 and parts["step_seconds"] == pytest.approx(100e-6)
    assert parts["parts"] == pytest.approx({"data wait": 10e-6, "forward": 30e-6, "backward": 30e-6,
                                            "optimizer": 15e-6, "communication": 10e-6, "other": 5e-6})


def test_a_rollback_drops_a_trace_in_progress(tmp_path):
    class Cpu(FakeAccelerator):
        class device:
            type = "cpu"
    profiler = StepProfiler((2, 3), None, Cpu, str(tmp_path))
    steps = profiler.steps(iter(range(10)), 0)
    next(steps)  # step 1
    profiler.step_done(1)
    next(steps)  # step 2: recording
    assert profiler._profiler is not None
    profiler.rolled_back(0)
    assert profiler._profiler is None and profiler._step == 0 and not (tmp_path / "profile").exists()


def test_on_a_cpu_nothing_cuda_is_touched(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch._C, "_cuda_attach_out_of_memory_observer", lambda f: pytest.fail("attached on a CPU"),
                        raising=False)

    class Cpu(FakeAccelerator):
        class device:
            type = "cpu"
    assert not StepProfiler((1, 2), [0], Cpu, str(tmp_path), memory_snapshot=True).memory_history
