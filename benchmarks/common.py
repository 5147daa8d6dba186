"""Shared by the benchmarks: run train.py the way a user does and read back what it measured, and read
this process's memory."""

import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_ports = itertools.count(29800)


ONE_CPU_PROCESS = ("--cpu", "--num_processes", "1", "--mixed_precision", "no")


def peak_mib():
    """This process's peak resident memory so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_mib():
    """This process's resident memory now, in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024


def launch_command(train_args, out, launch_args=ONE_CPU_PROCESS, port=None):
    """`accelerate launch LAUNCH_ARGS train.py TRAIN_ARGS --output_dir OUT`, as a user runs it."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(port or next(_ports)),
            "--num_machines", "1", "--dynamo_backend", "no", *launch_args,
            str(ROOT / "train.py"), *map(str, train_args), "--output_dir", str(out), "--sample_max_new_tokens", "1"]


def run_train(train_args, launch_args=ONE_CPU_PROCESS, env=None):
    """`accelerate launch LAUNCH_ARGS train.py TRAIN_ARGS` in a temporary output dir:
    (metrics.jsonl records, results.json)."""
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run(launch_command(train_args, out, launch_args), capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, **(env or {})})
        if done.returncode:
            sys.exit(f"train.py failed:\n{done.stderr[-3000:]}")
        records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        return records, json.load(open(os.path.join(out, "results.json")))


def steady_tokens_per_second(records):
    """Tokens/s over every logging window but the first (which holds start-up and warmup)."""
    windows = [r for r in records if "loss" in r]
    steps = [b["step"] - a["step"] for a, b in zip(windows, windows[1:])]
    # each window's seconds are steps x tokens_per_step / tokens_per_second; tokens_per_step cancels
    return sum(steps) / sum(n / r["tokens_per_second"] for n, r in zip(steps, windows[1:]))


def time_to_first_step(train_args, out, env=None):
    """Launch `accelerate launch train.py TRAIN_ARGS --output_dir OUT` (1 CPU process) and wait for it:
    (seconds from launch to the first training step's record in metrics.jsonl, seconds of the whole run)."""
    metrics = Path(out) / "metrics.jsonl"
    with tempfile.TemporaryFile("w+") as stderr:  # a file, not a pipe: nobody reads it while the run goes on

        def fail(what):
            stderr.seek(0)
            sys.exit(f"train.py {what}:\n{stderr.read()[-3000:]}")

        start = time.perf_counter()
        process = subprocess.Popen(launch_command(train_args, out), cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=stderr, text=True, env={**os.environ, **(env or {})})
        while not (metrics.exists() and '"loss"' in metrics.read_text()):
            if process.poll() is not None:
                fail("ended before its first step")
            time.sleep(0.05)
        first_step = time.perf_counter() - start
        if process.wait():
            fail("failed")
    return first_step, time.perf_counter() - start
