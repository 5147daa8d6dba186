"""Training from a token store: time to the first step and tokens/s against the in-job paths, and
the cost of --document_masking.

On a 50 MB corpus (JSON lines), `small` preset, block 128, batch 16, 1 CPU process:
  prepare_data.py                 the store, timed (tokenizer training + tokenization)
  --train_file, cold cache        train.py tokenizes in the job into its cache store
  --train_file, warm cache        the cached store (a second run of the same command)
  --data_dir STORE                the prepared store: nothing is read or tokenized in the job
  --data_dir STORE --document_masking
Time to first step: from launch to the first training step's record in metrics.jsonl. Tokens/s:
steady state, every logging window but the first. All rows run in this one process, one by one.

    python benchmarks/store_training.py            # ~6 minutes on 2 cores
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402
from benchmarks.data_pipeline import build_corpus  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--megabytes", type=int, default=50)
    p.add_argument("--steps", type=int, default=60)
    options = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        env = {"HF_HOME": os.path.join(work, "hf")}  # one cache for the tokenizer, fresh for this benchmark
        corpus = Path(work) / "corpus.jsonl"
        size = build_corpus(corpus, options.megabytes)
        store = os.path.join(work, "store")
        start = time.perf_counter()
        subprocess.run([sys.executable, "prepare_data.py", "--train_file", corpus, "--data_dir", store],
                       check=True, cwd=common.ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
        prepare = time.perf_counter() - start
        print(f"corpus {size / 2**20:.0f} MiB; prepare_data.py (tokenizer + store): {prepare:.1f} s", flush=True)
        train = ["--max_train_steps", options.steps, "--logging_steps", 10, "--eval_steps", 1000, "--max_eval_samples", 16]
        rows = {}
        for n, (name, data) in enumerate([("--train_file, cold cache", ["--train_file", corpus]),
                                          ("--train_file, warm cache", ["--train_file", corpus]),
                                          ("--data_dir STORE", ["--data_dir", store]),
                                          ("--data_dir STORE --document_masking", ["--data_dir", store,
                                                                                   "--document_masking"])]):
            out = os.path.join(work, f"run{n}")
            first, whole = common.time_to_first_step([*data, *train], out, env=env)
            records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
            rows[name] = (first, whole, common.steady_tokens_per_second(records))
            print(f"  {name}: first step {first:.1f} s, {rows[name][2]:,.0f} tokens/s", flush=True)
    print(f"\n{'run':<38}{'first step s':>13}{'whole run s':>12}{'tokens/s':>10}{'vs warm cache':>15}")
    base = rows["--train_file, warm cache"][2]
    for name, (first, whole, rate) in rows.items():
        print(f"{name:<38}{first:>13.1f}{whole:>12.1f}{rate:>10,.0f}{rate / base:>14.2f}x")
    masking = rows["--data_dir STORE --document_masking"][2] / rows["--data_dir STORE"][2]
    print(f"--document_masking vs plain packing: {masking:.2f}x tokens/s")


if __name__ == "__main__":
    main()
