"""--streaming: on-the-fly tokenize + pack throughput and memory, and what an exact resume costs.

On the data pipeline benchmark's corpus (the default job's text repeated to --megabytes MB), with
the default job's tokenizer, block size 1024, 32 sequences per optimizer step and the default
shuffle window. Each measurement runs in a fresh process:
  - one epoch streamed from the start, which records the stream position at --resume_at;
  - a resume from that position (re-reads one window), against the O(n) alternative of
    re-reading and re-tokenizing the stream up to the same block; both must give the same block;
  - --stream_readers: one reader of part 0 of L (one tokenizer thread, as one of L processes with a
    core each), from the corpus in 4 files (whole files per part) and in 1 (every L-th document):
    the job reads L times one reader's rate when each process has its own cores.

    python benchmarks/streaming.py            # ~1 minute on 2 CPU cores
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SAMPLES_PER_STEP = 32


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--megabytes", type=int, default=50)
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--resume_at", type=float, default=0.9, help="fraction of the epoch at which to resume")
    p.add_argument("--train_steps", type=int, default=80, help="steps of each train.py run")
    p.add_argument("--part_blocks", type=int, default=8192, help="blocks all parts yield together per reader count")
    p.add_argument("--worker", choices=["epoch", "resume", "reread", "part"], help=argparse.SUPPRESS)
    p.add_argument("--readers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--position", help=argparse.SUPPRESS)
    return p.parse_args()


def streamed_blocks(corpus, block, readers=1, window=None):
    """Part 0 of `readers` of the corpus (files separated by commas)."""
    from datasets import load_dataset

    from benchmarks.data_pipeline import default_tokenizer
    from utils.config import parse_args
    from utils.data import document_encoder
    from utils.stream import StreamedBlocks, split_stream

    source = load_dataset("json", data_files=corpus.split(","), split="train", streaming=True)
    window = window or parse_args([]).stream_shuffle_blocks
    encode = document_encoder(default_tokenizer())
    part = split_stream(source, readers)[0]
    return StreamedBlocks(part, "text", encode, block, window, seed=0).cut_to_steps(SAMPLES_PER_STEP // readers)


def worker(args):
    if args.worker == "part":  # this part's share of --part_blocks, in windows of one step: the reading rate
        blocks = streamed_blocks(args.corpus, args.block, args.readers, window=SAMPLES_PER_STEP // args.readers)
        start, wanted, count = time.perf_counter(), args.part_blocks // args.readers, 0
        for _ in blocks:
            count += 1
            if count == wanted:
                break
        seconds = time.perf_counter() - start
        return print(json.dumps({"blocks_per_second": count / seconds, "blocks": count, "seconds": seconds}))
    blocks = streamed_blocks(args.corpus, args.block)
    position = json.loads(Path(args.position).read_text()) if args.worker != "epoch" else None
    result = {}
    start = time.perf_counter()
    if args.worker == "epoch":
        count = sum(1 for _ in blocks)
        result["seconds"], result["blocks"] = time.perf_counter() - start, count
        at = int(count * args.resume_at) // SAMPLES_PER_STEP * SAMPLES_PER_STEP
        iterator = iter(blocks)  # once more to the resume point, to ask for the position there
        for _ in range(at + 1):
            next(iterator)
        Path(args.position).write_text(json.dumps(blocks.position(at)))
    else:
        if args.worker == "resume":
            blocks.start_at(position)
            iterator = iter(blocks)
        else:  # what a resume without a stream position does: read and tokenize everything before it again
            iterator = iter(blocks)
            for _ in range(position["samples_into_epoch"]):
                next(iterator)
        first = next(iterator)["input_ids"]
        result["first_block_seconds"] = time.perf_counter() - start
        result["first_block_head"] = first[:8].tolist()
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def run_worker(kind, corpus, position, block, *extra, env=None):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true", **(env or {})}
    out = subprocess.run([sys.executable, __file__, "--worker", kind, "--corpus", corpus, "--position", position,
                          "--block", str(block), *map(str, extra)], check=True, capture_output=True, text=True, env=env,
                         cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def readers_scaling(corpus, work, block, part_blocks):
    """One reader of part 0 of L, one tokenizer thread each; the job's rate is L readers' (one per process)."""
    lines = Path(corpus).read_text().splitlines(keepends=True)
    files = []
    for n in range(4):
        files.append(str(Path(work) / f"part{n}.jsonl"))
        Path(files[-1]).write_text("".join(lines[n::4]))
    print(f"\n--stream_readers L: part 0 of L read alone with one tokenizer thread (one of L processes with a core "
          f"each), {part_blocks:,} blocks / L")
    print(f"{'corpus':<34}{'L':>3}{'reader blocks/s':>17}{'job tokens/s':>14}{'vs L=1':>8}")
    for name, data in (("4 files (whole files per part)", ",".join(files)), ("1 file (every L-th document)", corpus)):
        base = None
        for readers in (1, 2, 4):
            rate = run_worker("part", data, "-", block, "--readers", readers, "--part_blocks", part_blocks,
                              env={"RAYON_NUM_THREADS": "1"})["blocks_per_second"]
            job = rate * readers * block
            base = base or job
            print(f"{name:<34}{readers:>3}{rate:>17,.1f}{job:>14,.0f}{job / base:>8.2f}")


def main():
    args = parse()
    if args.worker:
        worker(args)
        sys.stdout.flush()
        os._exit(0)  # a read-ahead thread may be inside the tokenizer: no interpreter teardown under it
    from benchmarks.data_pipeline import build_corpus

    with tempfile.TemporaryDirectory() as work:
        corpus, position = Path(work) / "corpus.jsonl", str(Path(work) / "position.json")
        size = build_corpus(corpus, args.megabytes)
        print(f"corpus: {size / 2**20:.0f} MiB of JSON lines, block size {args.block}, "
              f"{SAMPLES_PER_STEP} sequences per step")
        epoch = run_worker("epoch", str(corpus), position, args.block)
        tokens = epoch["blocks"] * args.block
        print(f"\none epoch streamed: {epoch['blocks']:,} blocks, {epoch['seconds']:.2f} s, "
              f"{tokens / epoch['seconds']:,.0f} tokens/s, peak RSS {epoch['peak_rss_mib']:,.0f} MiB")
        at = json.loads(Path(position).read_text())["samples_into_epoch"]
        resume, reread = (run_worker(kind, str(corpus), position, args.block) for kind in ("resume", "reread"))
        readers_scaling(str(corpus), work, args.block, args.part_blocks)
    print(f"\nresume at block {at:,} of {epoch['blocks']:,} ({at / epoch['blocks']:.0%} of the epoch):")
    print(f"{'how':<44}{'first block s':>14}{'peak RSS MiB':>14}")
    print(f"{'from the checkpoint position (one window)':<44}{resume['first_block_seconds']:>14.2f}"
          f"{resume['peak_rss_mib']:>14,.0f}")
    print(f"{'re-read and re-tokenize up to it (O(n))':<44}{reread['first_block_seconds']:>14.2f}"
          f"{reread['peak_rss_mib']:>14,.0f}")
    same = resume["first_block_head"] == reread["first_block_head"]
    print(f"same first block: {same}; resume is {reread['first_block_seconds'] / resume['first_block_seconds']:.1f}x "
          "faster than re-reading")
    if args.train_steps:
        training_cost(args.train_steps)


def training_cost(steps):
    """train.py on the default corpus, pre-tokenized vs --streaming: what tokenizing during training costs."""
    from benchmarks.common import run_train, steady_tokens_per_second

    base = ["--max_train_steps", steps, "--logging_steps", 10, "--eval_steps", 1000, "--max_eval_samples", 64]
    print(f"\ntrain.py, default corpus and preset, {steps} steps (steady state: the first logging window left out):")
    print(f"{'data':<34}{'tokens/s':>10}{'data wait %':>13}")
    for name, flags in (("pre-tokenized (memory-mapped)", []), ("--streaming", ["--streaming"])):
        records, _ = run_train([*base, *flags])
        waits = [r["data_wait_pct"] for r in records if "loss" in r][1:]
        print(f"{name:<34}{steady_tokens_per_second(records):>10,.0f}{sum(waits) / len(waits):>13.1f}")


if __name__ == "__main__":
    main()
