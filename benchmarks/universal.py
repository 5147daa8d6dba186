"""Converting a DeepSpeed ZeRO-2 checkpoint to the universal format (a resume on another GPU count):
seconds and peak memory (the converter and its worker processes together) per billion parameters,
with 1 worker (what the resume used before) and with every core (what it uses now).

    python benchmarks/universal.py            # ~5 minutes on 2 CPU cores, ~15 GB of disk
    python benchmarks/universal.py 125m       # one preset
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import ROOT, launch_command  # noqa: E402

ZERO2 = ("--config_file", "accelerate_configs/deepspeed_zero2.yaml", "--num_processes", "2", "--mixed_precision", "no")


def checkpoint(preset, out):
    """A 2-process ZeRO-2 checkpoint of `preset` after one step; returns (its path, parameter count)."""
    args = ["--model_preset", preset, "--max_train_steps", 1, "--checkpointing_steps", 1, "--block_size", 128,
            "--per_device_train_batch_size", 1, "--max_eval_samples", 1, "--eval_steps", 1000]
    done = subprocess.run(launch_command(args, out, ZERO2), cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if done.returncode:
        sys.exit(f"train.py failed:\n{done.stderr[-3000:]}")
    return Path(out) / "checkpoints" / "step_1", json.loads((Path(out) / "results.json").read_text())["parameters"]


def convert(step, workers):
    """(seconds, peak GiB of the converter's process tree) of convert_checkpoint.py STEP --workers N."""
    shutil.rmtree(step / "universal", ignore_errors=True)
    start, peak = time.perf_counter(), 0
    process = subprocess.Popen([sys.executable, str(ROOT / "convert_checkpoint.py"), str(step), "--workers",
                                str(workers)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tree = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [tree, *tree.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(0.05)
    if process.returncode:
        sys.exit(f"conversion failed:\n{process.stderr.read().decode()[-3000:]}")
    return time.perf_counter() - start, peak / 2**30


def main(presets=("125m", "350m")):
    rows = []
    for preset in presets:
        with tempfile.TemporaryDirectory() as out:
            step, parameters = checkpoint(preset, out)
            size = sum(f.stat().st_size for f in step.rglob("*") if f.is_file()) / 2**30
            for workers in (1, os.cpu_count()):
                seconds, peak = convert(step, workers)
                rows.append((preset, parameters, size, workers, seconds, peak))
                print(f"  {preset}, {workers} worker(s): {seconds:.1f} s, peak {peak:.2f} GiB", flush=True)
    print(f"\n{'preset':<8}{'params':>9}{'ckpt GiB':>10}{'workers':>9}{'seconds':>9}{'s per B':>9}"
          f"{'peak GiB':>10}{'GiB per B':>11}")
    for preset, parameters, size, workers, seconds, peak in rows:
        billions = parameters / 1e9
        print(f"{preset:<8}{parameters / 1e6:>8.0f}M{size:>10.2f}{workers:>9}{seconds:>9.1f}{seconds / billions:>9.0f}"
              f"{peak:>10.2f}{peak / billions:>11.1f}")


if __name__ == "__main__":
    main(tuple(sys.argv[1:]) or ("125m", "350m"))
