"""Data at scale: what opening a token store and ordering its blocks costs per process, from 1e6 to 1e10 blocks.

Each store is simulated: the manifest, folders and shard files of a real token store (utils/store.py),
the shards sparse files (they cost no disk; every token reads as 0), with --shard_tokens tokens per
shard (the default is about what prepare_data.py writes: 50,000 web documents). Each row runs in a
fresh process, the way train.py opens data: open_blocks (manifest, one stat per shard), then
build_dataloaders (the training order), and prints

  open s      open_blocks on a process other than the main one (manifest and shard indexes mapped)
  check s     the main process's check of every shard's size (one stat each: the only step that grows
              with the shard count, on one process; every process checks a shard again when it maps it)
  order s     build_dataloaders: the training order (utils/mixture.py MixtureSampler)
  first s     the first training batch from the start of the run
  resume s    a resume at 90% of the first epoch: start_at + the first batch there
  batch ms    each of the next 200 batches (random blocks over every shard: mappings come and go)
  anon MB     private memory added (RssAnon, the most seen after each step above; the shards' mapped pages
              are page cache, shared by the node's processes and given back under pressure)
  files       file descriptors held open after those batches (shards are mapped through a bounded cache)

and each cost as a ratio to the 1e6-block row with as many sources (the goal: flat, within noise).

    python benchmarks/data_scale.py                      # 1e6 .. 1e10 blocks, 1, 2 and 8 sources (~3 min)
    python benchmarks/data_scale.py --blocks 1e6 1e8     # fewer rows
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

BLOCK = 2048  # tokens per block
SAMPLES_PER_STEP = 512  # sequences per optimizer step (e.g. 64 GPUs x 8)
BATCH = 8  # per process


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=float, nargs="+", default=[1e6, 1e8, 1e9, 1e10])
    p.add_argument("--sources", type=int, nargs="+", default=[1, 2, 8])
    p.add_argument("--shard_tokens", type=int, default=1 << 26, help="tokens per shard (64M: ~50,000 documents)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args()


def simulate_store(path, blocks, sources, shard_tokens):
    """A token store of `blocks` training blocks over `sources` sources (sizes 1 : 2 : ... : n), sparse shards."""
    import io

    import numpy as np

    sizes = [blocks * (i + 1) // sum(range(1, sources + 1)) for i in range(sources)]
    manifest = {"format": 3, "tokenizer": "simulated", "eos_token_id": 0, "vocab_size": 50257, "dtype": "uint16",
                "shard_documents": 50_000, "content_id": "simulated", "sources": []}
    shards_written = 0
    for number, size in enumerate(sizes):
        folder = f"{number:02d}-source{number}"
        splits = {}
        for split, tokens in (("train", size * BLOCK), ("validation", 4 * BLOCK)):
            os.makedirs(os.path.join(path, folder, split))
            lengths = [min(shard_tokens, tokens - start) for start in range(0, tokens, shard_tokens)]
            for k, n in enumerate(lengths):
                with open(os.path.join(path, folder, split, f"shard-{k:05d}.bin"), "wb") as f:
                    f.truncate(n * 2)  # sparse: no disk used
            buffer = io.BytesIO()
            n = np.array(lengths, dtype=np.int64)
            np.save(buffer, np.stack([n, n // 1000, np.cumsum(n)], axis=1).reshape(-1, 3))
            with open(os.path.join(path, folder, split, "index.npy"), "wb") as f:
                f.write(buffer.getvalue())
            shards_written += len(lengths)
            splits[split] = {"shards": len(lengths), "tokens": tokens, "documents": tokens // 1000}
        manifest["sources"].append({"label": f"source{number}", "identity": {"simulated": number},
                                    "text_column": "text", "validation": "given", "content": f"simulated{number}",
                                    "documents": {s: v["documents"] for s, v in splits.items()},
                                    "dir": folder, "splits": splits})
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return sizes, shards_written


def status(field):
    """A /proc/self/status field in MB (RssAnon: private memory resident now)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024


def worker(path, sources):
    import torch  # noqa: F401  (imported before the baseline: its memory is not the data's)

    from utils.data import build_dataloaders, open_blocks
    from utils.store import check_store, read_manifest

    base_rss, base_files = status("RssAnon"), len(os.listdir("/proc/self/fd"))
    seen = []
    weights = list(range(sources, 0, -1))  # the reverse of the sizes: small sources repeat, large ones carry over
    timed = {}
    start = time.perf_counter()
    blocks = open_blocks(path, BLOCK, max_eval_samples=4, weights=weights if sources > 1 else None, check=False)
    timed["open"] = time.perf_counter() - start
    seen.append(status("RssAnon"))
    start = time.perf_counter()
    train, _, order = build_dataloaders(blocks, SAMPLES_PER_STEP, BATCH, BATCH, seed=0)
    timed["order"] = time.perf_counter() - start
    seen.append(status("RssAnon"))
    start = time.perf_counter()
    next(iter(train))
    timed["first"] = time.perf_counter() - start
    seen.append(status("RssAnon"))
    start = time.perf_counter()
    order.start_at(order.position(order.usable * 9 // 10 // SAMPLES_PER_STEP * SAMPLES_PER_STEP))
    batches = iter(train)
    next(batches)
    timed["resume"] = time.perf_counter() - start
    seen.append(status("RssAnon"))
    start = time.perf_counter()
    for _ in range(200):
        next(batches)
    timed["batch_ms"] = (time.perf_counter() - start) / 200 * 1000
    timed["anon_mb"] = max(seen + [status("RssAnon")]) - base_rss
    timed["files"] = len(os.listdir("/proc/self/fd")) - base_files
    timed["usable"] = order.usable
    start = time.perf_counter()
    check_store(path, read_manifest(path))
    timed["check"] = time.perf_counter() - start
    print(json.dumps(timed))


def main():
    args = parse()
    if args.worker:
        return worker(args.worker, int(os.environ["SOURCES"]))
    print(f"block {BLOCK} tokens, {SAMPLES_PER_STEP} sequences per step, {args.shard_tokens:,} tokens per shard")
    print(f"{'blocks':>8} {'src':>3} {'shards':>7} {'open s':>7} {'order s':>8} {'first s':>8} {'resume s':>9} "
          f"{'batch ms':>8} {'anon MB':>8} {'files':>5} {'check s':>8}   ratio to 1e6: open order first resume batch anon")
    for sources in args.sources:
        reference = None
        for blocks in args.blocks:
            with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as path:
                _, shards = simulate_store(path, int(blocks), sources, args.shard_tokens)
                done = subprocess.run([sys.executable, __file__, "--worker", path], capture_output=True, text=True,
                                      env={**os.environ, "SOURCES": str(sources)})
            if done.returncode:
                sys.exit(f"worker failed at {blocks:.0e} blocks, {sources} sources:\n{done.stderr[-3000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            reference = reference or r
            ratios = " ".join(f"{r[k] / max(reference[k], 1e-9):.2f}" for k in ("open", "order", "first", "resume",
                                                                                  "batch_ms", "anon_mb"))
            print(f"{blocks:8.0e} {sources:3d} {shards:7d} {r['open']:7.3f} {r['order']:8.3f} {r['first']:8.3f} "
                  f"{r['resume']:9.3f} {r['batch_ms']:8.2f} {r['anon_mb']:8.1f} {r['files']:5d} {r['check']:8.3f}   {ratios}", flush=True)


if __name__ == "__main__":
    main()
