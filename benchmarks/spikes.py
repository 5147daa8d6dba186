"""The cost of loss-spike handling (utils/spikes.py): tokens/s with it (the default) vs --spike_sigma 0,
on the default model and data, runs interleaved A B A B so the machine's drift hits both alike.

The check adds one all-reduce of the step's loss and one host read of (loss, grad norm) per optimizer
step; the non-finite guard already read the norm once per step, so on a GPU the host was waiting there
anyway.

    python benchmarks/spikes.py     # ~3 minutes on 2 CPU cores
"""

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import run_train, steady_tokens_per_second  # noqa: E402


def main(steps=120, rounds=2):
    args = ["--max_train_steps", steps, "--logging_steps", 10, "--eval_steps", 10 * steps, "--spike_window", 32]
    speeds = {"on": [], "off": []}
    for _ in range(rounds):
        for name, extra in (("on", []), ("off", ["--spike_sigma", 0])):
            records, results = run_train([*args, *extra])
            assert (results["spikes"] is None) == (name == "off")
            speeds[name].append(steady_tokens_per_second(records))
            print(f"  spike handling {name}: {speeds[name][-1]:,.0f} tokens/s", flush=True)
    on, off = statistics.median(speeds["on"]), statistics.median(speeds["off"])
    print(f"\nspike handling on / off: {on:,.0f} / {off:,.0f} tokens/s = {on / off:.3f}x "
          f"(median of {rounds} runs each; this machine's noise is about +-15% between runs)")


if __name__ == "__main__":
    main()
