"""Convert a DeepSpeed ZeRO checkpoint for a resume on another number of GPUs, before the job.

    python convert_checkpoint.py OUTPUT_DIR/checkpoints/step_N [--workers N]

A run resumed on another process count converts the checkpoint itself (utils/checkpoint.py
prepare_resume), on its main process, while the other processes wait on the filesystem: about 2 minutes
per billion parameters with every core (benchmarks/RESULTS.md), GPU time the whole job pays for. This
does it ahead, on any machine that sees the checkpoint: it writes STEP_N/universal, which the resume
then finds and loads.
"""

import argparse
import os
import time

from utils.checkpoint import DEEPSPEED_TAG, UNIVERSAL, conversion_workers, convert_to_universal
from utils.errors import UserError, run_cli


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("checkpoint", help="a step_N directory written under DeepSpeed")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes for extracting and merging (default: every core that has memory for two "
                             "of the largest shard files)")
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(args.checkpoint, DEEPSPEED_TAG)):
        raise UserError(f"{args.checkpoint} holds no DeepSpeed checkpoint ({DEEPSPEED_TAG}/): pass a step_N directory "
                        "of a run under a DeepSpeed config (DDP and FSDP2 checkpoints reshard as they load)")
    if os.path.isdir(os.path.join(args.checkpoint, UNIVERSAL)):
        print(f"{os.path.join(args.checkpoint, UNIVERSAL)} exists already: nothing to do")
        return 0
    workers = args.workers or conversion_workers(args.checkpoint)
    start = time.perf_counter()
    path = convert_to_universal(args.checkpoint, workers)
    print(f"converted in {time.perf_counter() - start:.0f} s with {workers} workers: {path}; resume with "
          f"--resume_from_checkpoint {args.checkpoint}")
    return 0


if __name__ == "__main__":
    run_cli(main)
