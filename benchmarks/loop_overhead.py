"""Training-loop overhead: train.py vs a bare PyTorch loop (the limit) vs transformers.Trainer.

Same model (a preset), same packed data, same batch, fp32 (or --mixed_precision bf16 on a GPU),
each contender in its own process, repeated and interleaved; medians of steady-state tokens/s
(the first --warmup steps of every run are left out).

    python benchmarks/loop_overhead.py                    # ~5 minutes on 2 CPU cores
    python benchmarks/loop_overhead.py --preset 125m --batch 8 --block 1024 --mixed_precision bf16   # a GPU
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import run_train, steady_tokens_per_second  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mixed_precision", default="no", choices=["no", "bf16"])
    p.add_argument("--worker", choices=["bare", "trainer"], help=argparse.SUPPRESS)
    return p.parse_args()


def data_and_model(args):
    """The default job's packed blocks and a freshly initialized preset, exactly as train.py builds them."""
    from accelerate import PartialState
    from utils.config import parse_args as train_args
    from utils.data import load_tokenizer, tokenize_and_pack
    from utils.model import build_model, model_config
    from utils.sources import load_source

    targs = train_args(["--model_preset", args.preset, "--block_size", str(args.block)])
    sources = [load_source(targs.sources[0])]
    tokenizer = load_tokenizer(None, targs.vocab_size, sources, PartialState())
    blocks = tokenize_and_pack(sources, tokenizer, targs.block_size, PartialState())[0]["train"]
    return blocks, build_model(model_config(targs, None, tokenizer), seed=targs.seed)


def bare_loop(args):
    """Forward, backward, AdamW step, nothing else."""
    import torch

    blocks, model = data_and_model(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=device == "cuda" or None,
                                  foreach=None if device == "cuda" else True)
    loader = torch.utils.data.DataLoader(blocks, batch_size=args.batch, shuffle=True, pin_memory=device == "cuda")
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")
    times, batches = [], iter(loader)
    for _ in range(args.steps):
        ids = next(batches)["input_ids"].to(device, non_blocking=True)
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    return times


def causal_lm_batch(rows):
    import torch

    ids = torch.stack([row["input_ids"] for row in rows])
    return {"input_ids": ids, "labels": ids}


def trainer_loop(args):
    """transformers.Trainer with the same optimizer settings and no evaluation, saving or logging."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    blocks, model = data_and_model(args)
    times = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *_, **__):
            times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=3e-3,
            weight_decay=0.1, adam_beta2=0.95, warmup_steps=20, lr_scheduler_type="cosine", max_grad_norm=1.0,
            logging_steps=10, report_to=[], save_strategy="no", eval_strategy="no", disable_tqdm=True,
            bf16=args.mixed_precision == "bf16", dataloader_num_workers=0)
        trainer = Trainer(model=model, args=training_args, train_dataset=blocks, callbacks=[StepTimes()],
                          data_collator=causal_lm_batch)
        trainer.train()
    return times


def train_py(args):
    """train.py under accelerate launch, as a user runs it; tokens/s from its metrics.jsonl windows."""
    records, _ = run_train(["--model_preset", args.preset, "--per_device_train_batch_size", args.batch,
                            "--block_size", args.block, "--max_train_steps", args.steps, "--logging_steps",
                            args.warmup, "--eval_steps", 10 * args.steps],
                           launch_args=("--num_processes", "1", "--mixed_precision", args.mixed_precision))
    return steady_tokens_per_second(records)


def loop_tokens_per_second(times, args):
    measured = times[args.warmup - 1:]
    return (len(measured) - 1) * args.batch * args.block / (measured[-1] - measured[0])


def main():
    args = parse()
    if args.worker:
        times = bare_loop(args) if args.worker == "bare" else trainer_loop(args)
        print(json.dumps({"tokens_per_second": loop_tokens_per_second(times, args)}))
        return
    if args.steps % args.warmup:
        sys.exit("--steps must be a multiple of --warmup (train.py logs in windows of --warmup steps)")
    results = {"bare PyTorch": [], "train.py": [], "transformers.Trainer": []}
    base = sys.argv[1:]
    for repeat in range(args.repeats):  # interleaved, so drift in machine speed hits every contender alike
        for worker, name in (("bare", "bare PyTorch"), ("trainer", "transformers.Trainer")):
            out = subprocess.run([sys.executable, __file__, *base, "--worker", worker], check=True,
                                 capture_output=True, text=True, cwd=ROOT).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1])["tokens_per_second"])
        results["train.py"].append(train_py(args))
        print(f"repeat {repeat + 1}/{args.repeats}: " +
              ", ".join(f"{name} {values[-1]:,.0f}" for name, values in results.items()), flush=True)
    medians = {name: statistics.median(values) for name, values in results.items()}
    bare = medians["bare PyTorch"]
    print(f"\nsteady-state tokens/s, median of {args.repeats} (preset {args.preset}, batch {args.batch} x "
          f"{args.block}, {args.mixed_precision}, {args.steps} steps, first {args.warmup} left out)")
    print(f"{'contender':<22}{'tokens/s':>12}{'vs bare':>10}   runs")
    for name, value in medians.items():
        runs = ", ".join(f"{v:,.0f}" for v in results[name])
        print(f"{name:<22}{value:>12,.0f}{value / bare:>9.3f}x   {runs}")
    print(f"train.py / Trainer: {medians['train.py'] / medians['transformers.Trainer']:.3f}x")


if __name__ == "__main__":
    main()
