"""The loss's memory: one evaluation and one training step of a model with a 128k vocabulary, transformers'
loss (every logit upcast to fp32 at once) against utils/loss.py (a slice at a time).

A one-layer Llama with hidden size 64 keeps everything but the logits small, so the peak is the logits'.
Each contender runs in a fresh process; the peak resident memory it adds over the model and inputs is
printed with its ratio to transformers' in the same run.

    python benchmarks/loss_memory.py                   # bf16 weights (as under mixed precision), ~1 min
    python benchmarks/loss_memory.py --dtype float32
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import current_mib, peak_mib  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=128_256)
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args()




def worker(args):
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig
    from transformers.loss.loss_utils import ForCausalLMLoss

    from utils.loss import token_losses
    from utils.model import build_model

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = build_model(LlamaConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=2)).to(dtype)
    kind, loss = args.worker.split("-")
    if loss == "transformers":
        model.loss_function = ForCausalLMLoss
    ids = torch.randint(0, args.vocab, (args.batch, args.block))
    with torch.no_grad():  # one warm-up pass: allocator pools and lazy initialization are not the loss's
        model(input_ids=ids[:1, :8])
    before = current_mib()
    if kind == "eval":
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
            labels = ids[:, 1:]
            if loss == "transformers":  # what train.py's evaluate did before
                value = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="none").sum()
            else:
                value = token_losses(logits[:, :-1], labels).sum()
    else:
        value = model(input_ids=ids, labels=ids, use_cache=False).loss
        value.backward()
    print(json.dumps({"added_mb": peak_mib() - before, "loss": float(value),
                      "logits_mb": args.batch * args.block * args.vocab * torch.finfo(dtype).bits / 8 / 2**20}))


def main():
    args = parse()
    if args.worker:
        return worker(args)
    print(f"vocab {args.vocab:,}, block {args.block}, batch {args.batch}, {args.dtype} weights")
    print(f"{'step':<6} {'loss':<13} {'peak MB added':>14} {'x logits':>9} {'vs transformers':>16}")
    for kind in ("eval", "train"):
        reference = None
        for loss in ("transformers", "sliced"):
            flags = [f"--{k}={v}" for k, v in vars(args).items() if k != "worker"]
            done = subprocess.run([sys.executable, __file__, *flags, "--worker", f"{kind}-{loss}"], capture_output=True,
                                  text=True)
            if done.returncode:
                sys.exit(done.stderr[-3000:])
            r = json.loads(done.stdout.strip().splitlines()[-1])
            reference = reference or r
            print(f"{kind:<6} {loss:<13} {r['added_mb']:14.0f} {r['added_mb'] / r['logits_mb']:9.2f} "
                  f"{r['added_mb'] / reference['added_mb']:16.2f}   (loss {r['loss']:.4f})", flush=True)


if __name__ == "__main__":
    main()
