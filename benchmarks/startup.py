"""Time to first step of the default job (`accelerate launch train.py`), cold and warm cache.

Cold: an empty HF_HOME, so the corpus is written, the tokenizer trained and the data tokenized.
Warm: the same HF_HOME again, everything cached. Measured from launch to the first training
step's record in metrics.jsonl (start-up, imports, data, model, the step-0 evaluation, step 1).

    python benchmarks/startup.py          # ~1 minute
"""

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402


def time_to_first_step(hf_home, out):
    return common.time_to_first_step(["--max_train_steps", "1"], out, env={"HF_HOME": hf_home})


def main():
    with tempfile.TemporaryDirectory() as work:
        rows = [(name, *time_to_first_step(os.path.join(work, "hf"), os.path.join(work, name)))
                for name in ("cold cache", "warm cache")]
    print(f"{'default job':<14}{'first step s':>14}{'whole run s':>13}")
    for name, first, whole in rows:
        print(f"{name:<14}{first:>14.1f}{whole:>13.1f}")


if __name__ == "__main__":
    main()
