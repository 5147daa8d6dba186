"""FSDP2: each process's peak memory while the model is built, sharded and initialized, and while the
final model is saved.

Build:
    before: the whole model built and initialized on every process's CPU, then sharded (what accelerate
            does with a model handed to prepare);
    after:  built on the meta device, sharded there, then each process allocates and initializes only its
            shards (train.py under an FSDP config: utils/model.py initialize_shards).
Final save (of the model built "after"):
    before: accelerate's get_state_dict (the full state dict on rank 0's CPU), written by rank 0;
    after:  utils/export.py save_model: each process gathers one tensor at a time, keeps its share, writes it.

Two processes over gloo on CPU (FSDP2 itself runs there), the `1b` preset with a 32k vocabulary by
default. Each mode runs in fresh processes; printed per rank: the peak resident memory added over
the imports, and the parameters it holds at the end, with the ratio of after to before.

    python benchmarks/fsdp_memory.py                 # ~2 minutes on 2 CPU cores
    python benchmarks/fsdp_memory.py --preset small
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import current_mib, peak_mib  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="1b")
    p.add_argument("--vocab", type=int, default=32_000)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--worker", choices=["before", "after", "save_before", "save_after"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args()




def worker(args):
    import torch
    import torch.distributed as dist
    from accelerate import init_empty_weights
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from utils.export import save_model
    from utils.model import import_model_code, initialize_by_name, initialize_shards, preset_config

    dist.init_process_group("gloo")
    config = preset_config(args.preset, args.vocab)
    import_model_code(config)
    AutoModelForCausalLM.from_config(preset_config("tiny", 256))  # the code paths warmed up, not counted
    base, start = peak_mib(), time.perf_counter()
    if args.worker == "before":
        model = AutoModelForCausalLM.from_config(config)
        initialize_by_name(model, seed=0)
    else:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
    for layer in model.model.layers:  # one FSDP unit per decoder layer, as the shipped fsdp.yaml wraps
        fully_shard(layer)
    fully_shard(model)
    if args.worker != "before":
        initialize_shards(model, 0, torch.device("cpu"))
    held = sum(p.to_local().numel() for p in model.parameters())
    result = {"rank": dist.get_rank(), "added_mib": peak_mib() - base, "held_mib": held * 4 / 2**20,
              "parameters": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - start}
    if args.worker.startswith("save"):
        with tempfile.TemporaryDirectory() as folder:
            dist.barrier()
            before, start = current_mib(), time.perf_counter()
            if args.worker == "save_after":
                save_model(model, folder)
            else:  # accelerate's FSDP2 get_state_dict, then rank 0 writes it
                from safetensors.torch import save_file
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

                full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                if dist.get_rank() == 0:
                    save_file({k: v.contiguous() for k, v in full.items()}, os.path.join(folder, "model.safetensors"))
                del full
            dist.barrier()
            result.update(added_mib=max(peak_mib() - before, 0), seconds=time.perf_counter() - start)
    Path(args.out, f"{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    os._exit(0)  # gloo's teardown sometimes aborts a finished run


def run(mode, args, port):
    with tempfile.TemporaryDirectory() as folder:
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes),
                              "--master_port", str(port), __file__, "--worker", mode, "--preset", args.preset,
                              "--vocab", str(args.vocab), "--out", folder], capture_output=True, text=True, cwd=ROOT)
        results = [json.loads(path.read_text()) for path in sorted(Path(folder).glob("*.json"))]
    if len(results) != args.processes:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return sorted(results, key=lambda r: r["rank"])


def main():
    args = parse()
    if args.worker:
        return worker(args)
    runs = {mode: run(mode, args, port) for port, mode in enumerate(("before", "after", "save_before", "save_after"),
                                                                      29471)}
    params = runs["before"][0]["parameters"]
    print(f"preset {args.preset}: {params / 1e9:.2f}B parameters ({params * 4 / 2**30:.1f} GiB in fp32), "
          f"{args.processes} processes, FSDP2 over gloo on CPU")
    for phase, (before, after) in (("build", ("before", "after")), ("final save", ("save_before", "save_after"))):
        print(f"\n{phase}: peak memory added per process")
        print(f"{'rank':<6}{'shard held MiB':>16}{'before MiB':>12}{'after MiB':>11}{'after/before':>14}"
              f"{'s before':>10}{'s after':>9}")
        for b, a in zip(runs[before], runs[after]):
            print(f"{b['rank']:<6}{a['held_mib']:>16,.0f}{b['added_mib']:>12,.0f}{a['added_mib']:>11,.0f}"
                  f"{a['added_mib'] / b['added_mib']:>14.2f}{b['seconds']:>10.1f}{a['seconds']:>9.1f}")


if __name__ == "__main__":
    main()
