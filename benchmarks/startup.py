"""Time to first step of the default job (`accelerate launch train.py`), cold and warm cache.

Cold: an empty HF_HOME, so the corpus is written, the tokenizer trained and the data tokenized.
Warm: the same HF_HOME again, everything cached. Measured from launch to the first training
step's record in metrics.jsonl (start-up, imports, data, model, the step-0 evaluation, step 1).

    python benchmarks/startup.py          # ~1 minute
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def time_to_first_step(hf_home, out):
    metrics = Path(out) / "metrics.jsonl"
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "29899",
                                str(ROOT / "train.py"), "--max_train_steps", "1", "--output_dir", out,
                                "--sample_max_new_tokens", "1"], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "HF_HOME": hf_home})
    while not (metrics.exists() and '"loss"' in metrics.read_text()):
        if process.poll() is not None:
            sys.exit("train.py ended before its first step")
        time.sleep(0.05)
    first_step = time.perf_counter() - start
    process.wait()
    return first_step, time.perf_counter() - start


def main():
    with tempfile.TemporaryDirectory() as work:
        rows = [(name, *time_to_first_step(os.path.join(work, "hf"), os.path.join(work, name)))
                for name in ("cold cache", "warm cache")]
    print(f"{'default job':<14}{'first step s':>14}{'whole run s':>13}")
    for name, first, whole in rows:
        print(f"{name:<14}{first:>14.1f}{whole:>13.1f}")


if __name__ == "__main__":
    main()
