"""Test-only launcher: train.py with DeepSpeed's universal conversion made SECONDS slower, as a big
checkpoint's is (about 2 minutes per billion parameters).

    accelerate launch ... tests/slow_conversion.py SECONDS train.py ARGS
"""

import os
import runpy
import sys
import time

seconds, script = float(sys.argv[1]), os.path.abspath(sys.argv[2])
sys.argv = sys.argv[2:]
sys.path.insert(0, os.path.dirname(script))

import utils.checkpoint as checkpoint  # noqa: E402

_convert = checkpoint.convert_to_universal


def slow_convert(*args, **kwargs):
    time.sleep(seconds)
    return _convert(*args, **kwargs)


checkpoint.convert_to_universal = slow_convert
runpy.run_path(script, run_name="__main__")
