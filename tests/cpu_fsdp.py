"""Test-only launcher: run train.py on accelerate's FSDP2 path on CPU, over gloo.

    accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 2 --mixed_precision no \\
        tests/cpu_fsdp.py train.py ARGS

accelerate never applies an FSDP config on a machine without GPUs (it silently trains without
sharding), and train.py rightly refuses one there. FSDP2 itself runs on CPU over gloo, so this shim
tells accelerate's state it is a GPU-type run before train.py creates its Accelerator, and skips
the product's refusal. It is never part of the product: the tests use it to prove fsdp.yaml's path
(sharded training, DCP checkpoints, resharding on resume, the gathered final save).
"""

import os
import runpy
import sys

from accelerate import PartialState
from accelerate.utils import DistributedType

script = os.path.abspath(sys.argv[1])
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))

PartialState(backend="gloo")  # creates the process group; accelerate would pick none on CPU
PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # so Accelerator turns it into FSDP

import utils.distributed as distributed  # noqa: E402  (after the state above, before train.py imports it)

_product_preflight = distributed.preflight


def preflight(args, env=os.environ):
    """The product's preflight as on a GPU machine: past the "FSDP needs GPUs" refusal meant for users."""
    cuda = distributed.torch.cuda.is_available
    distributed.torch.cuda.is_available = lambda: True
    try:
        plan = _product_preflight(args, env)
    finally:
        distributed.torch.cuda.is_available = cuda
    distributed.share_cores(env)  # as preflight does on CPU
    return plan


distributed.preflight = preflight
runpy.run_path(script, run_name="__main__")
