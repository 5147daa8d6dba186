"""Data pipeline: tokenize + pack throughput and peak RAM: ours (the token store that prepare_data.py and
the in-job cache write) vs run_clm_no_trainer.py's, and vs the tokenizer's own batch encoder alone.

On a corpus of at least --megabytes MB (Python's documentation, the default job's text, repeated),
with the same trained tokenizer and block size, each pipeline in a fresh process with an empty
`datasets` cache. Ours runs twice: the second run must come from the cache.

    python benchmarks/data_pipeline.py            # ~3 minutes on 2 CPU cores
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--megabytes", type=int, default=50)
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--worker", choices=["ours", "classic", "encoder"], help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    return p.parse_args()


def build_corpus(path, megabytes):
    """JSON lines of real prose, repeated to size (the tokenizer's speed does not depend on novelty)."""
    from utils.sources import embedded_corpus_file

    lines = Path(embedded_corpus_file()).read_text()
    copies = -(-megabytes * 2**20 // len(lines.encode()))
    path.write_text(lines * copies)
    return path.stat().st_size


def default_tokenizer():
    """The default job's tokenizer (trained on the embedded corpus once, then cached)."""
    from accelerate import PartialState
    from utils.config import parse_args
    from utils.data import load_tokenizer
    from utils.sources import load_source

    args = parse_args([])
    return load_tokenizer(None, args.vocab_size, [load_source(args.sources[0])], PartialState())


def ours(raw, tokenizer, block):
    from accelerate import PartialState
    from datasets import DatasetDict
    from utils.data import tokenize_and_pack
    from utils.sources import in_memory_source

    source = in_memory_source(DatasetDict(train=raw, validation=raw.select(range(10))))  # 10 documents: noise
    return len(tokenize_and_pack([source], tokenizer, block, PartialState())[0]["train"]) * block


def encoder(raw, tokenizer, block):
    """The limit: the tokenizer's own Rust batch encoder over the same text, batches of 1,000, nothing kept."""
    backend, texts, tokens = tokenizer.backend_tokenizer, raw["text"], 0
    for i in range(0, len(texts), 1000):
        tokens += sum(len(e.ids) + 1 for e in backend.encode_batch_fast(texts[i:i + 1000], add_special_tokens=False))
    return tokens // block * block


def classic(raw, tokenizer, block):
    """transformers' examples/pytorch/language-modeling/run_clm_no_trainer.py, as written there."""
    def tokenize_function(examples):
        return tokenizer(examples["text"])

    tokenized = raw.map(tokenize_function, batched=True, remove_columns=raw.column_names)

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block) * block
        result = {k: [t[i: i + block] for i in range(0, total_length, block)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    return len(tokenized.map(group_texts, batched=True)) * block


def run_worker(name, corpus, cache, block):
    env = {**os.environ, "HF_DATASETS_CACHE": cache, "HF_HOME": os.path.join(cache, "hf"), "TOKENIZERS_PARALLELISM": "true"}
    out = subprocess.run([sys.executable, __file__, "--worker", name, "--corpus", corpus, "--block", str(block)],
                         check=True, capture_output=True, text=True, env=env, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    args = parse()
    if args.worker:
        from datasets import load_dataset

        tokenizer, raw = default_tokenizer(), load_dataset("json", data_files=args.corpus, split="train")
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        tokens = {"ours": ours, "classic": classic, "encoder": encoder}[args.worker](raw, tokenizer, args.block)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"seconds": seconds, "tokens": tokens, "peak_rss_mib": peak / 1024,
                          "added_rss_mib": (peak - rss_before) / 1024}))
        return
    with tempfile.TemporaryDirectory() as work:
        corpus = Path(work) / "corpus.jsonl"
        size = build_corpus(corpus, args.megabytes)
        print(f"corpus: {size / 2**20:.0f} MiB of JSON lines, block size {args.block}")
        rows = {}
        for name, cache in (("encoder", "encoder"), ("classic", "classic"), ("ours", "ours"), ("ours, cached", "ours")):
            rows[name] = run_worker(name.split(",")[0], str(corpus), os.path.join(work, cache), args.block)
            r = rows[name]
            print(f"  {name}: {r['seconds']:.1f} s", flush=True)
    print(f"\n{'pipeline':<28}{'seconds':>9}{'tokens/s':>12}{'peak RSS MiB':>14}{'added MiB':>11}")
    for name, r in rows.items():
        rate = f"{r['tokens'] / r['seconds']:,.0f}" if name != "ours, cached" else "(cache)"
        print(f"{name:<28}{r['seconds']:>9.2f}{rate:>12}{r['peak_rss_mib']:>14,.0f}{r['added_rss_mib']:>11,.0f}")
    print(f"ours vs the tokenizer alone: {rows['encoder']['seconds'] / rows['ours']['seconds']:.2f}x; "
          f"speed-up ours vs run_clm_no_trainer: {rows['classic']['seconds'] / rows['ours']['seconds']:.2f}x; "
          f"cached second run: {rows['ours, cached']['seconds']:.2f} s")


if __name__ == "__main__":
    main()
