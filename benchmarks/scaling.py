"""Scaling on CPU: tokens/s and peak memory per process of 1 process vs 2 (DDP, DeepSpeed ZeRO-2).

Same model, data and global batch (16 sequences: 1 process x 8 x accumulation 2, or 2 x 8);
steady-state tokens/s from train.py's own metrics, peak RSS of the busiest process.

    python benchmarks/scaling.py          # ~3 minutes on 2 CPU cores (the first DeepSpeed launch
                                          # compiles its CPU ops: set TORCH_EXTENSIONS_DIR to cache them)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import run_train, steady_tokens_per_second  # noqa: E402

CONFIGS = [  # name, accelerate launch arguments, extra environment
    ("1 process", ("--cpu", "--num_processes", "1", "--mixed_precision", "no"), None),
    ("DDP, 2 processes", ("--config_file", "accelerate_configs/multi_cpu.yaml"), None),
    ("ZeRO-2, 2 processes", ("--config_file", "accelerate_configs/deepspeed_zero2.yaml", "--num_processes", "2",
                             "--mixed_precision", "no"), {"DS_ACCELERATOR": "cpu"}),
]


def main(steps=40):
    args = ["--per_device_train_batch_size", 8, "--global_batch_size", 16, "--max_train_steps", steps,
            "--logging_steps", 10, "--eval_steps", 10 * steps]
    rows = []
    for name, launch_args, env in CONFIGS:
        records, results = run_train(args, launch_args, env)
        assert results["num_processes"] == (1 if name.startswith("1") else 2), results  # no silent fallback
        rows.append((name, results["distributed_type"], steady_tokens_per_second(records),
                     max(r["peak_memory_gib"] for r in records if "peak_memory_gib" in r)))
        print(f"  {name}: done", flush=True)
    base = rows[0][2]
    print(f"\n{'config':<22}{'type':<12}{'tokens/s':>10}{'vs 1 proc':>11}{'peak GiB/proc':>15}")
    for name, kind, tps, memory in rows:
        print(f"{name:<22}{kind:<12}{tps:>10,.0f}{tps / base:>10.2f}x{memory:>15.2f}")


if __name__ == "__main__":
    main()
