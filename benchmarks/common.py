"""Shared by the benchmarks: run train.py the way a user does and read back what it measured."""

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_ports = itertools.count(29800)


def run_train(train_args, launch_args=("--cpu", "--num_processes", "1", "--mixed_precision", "no"), env=None):
    """`accelerate launch LAUNCH_ARGS train.py TRAIN_ARGS` in a temporary output dir:
    (metrics.jsonl records, results.json)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(next(_ports)),
               "--num_machines", "1", "--dynamo_backend", "no", *launch_args,
               str(ROOT / "train.py"), *map(str, train_args), "--output_dir", out, "--sample_max_new_tokens", "1"]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
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


def time_to_first_step(train_args, out, env=None, port=29899):
    """Launch `accelerate launch train.py TRAIN_ARGS --output_dir OUT` (1 CPU process) and wait for it:
    (seconds from launch to the first training step's record in metrics.jsonl, seconds of the whole run)."""
    metrics = Path(out) / "metrics.jsonl"
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(port),
                                "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                                "--dynamo_backend", "no", str(ROOT / "train.py"), *map(str, train_args),
                                "--output_dir", out, "--sample_max_new_tokens", "1"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})})
    while not (metrics.exists() and '"loss"' in metrics.read_text()):
        if process.poll() is not None:
            sys.exit(f"train.py ended before its first step:\n{process.stderr.read()[-3000:]}")
        time.sleep(0.05)
    first_step = time.perf_counter() - start
    if process.wait():
        sys.exit(f"train.py failed:\n{process.stderr.read()[-3000:]}")
    return first_step, time.perf_counter() - start
