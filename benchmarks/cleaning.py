"""Cleaning throughput and peak memory: prepare_data.py --clean's glue (utils/clean.py) vs datatrove's own
pipeline run directly on the same text (its JsonlReader, the same steps and executor, no writer: the limit).

Each step alone, on a synthetic corpus of --megabytes MB (tests/synthetic_text.py, with ~3% planted exact and
near duplicates, boilerplate, gibberish and copied validation passages), with every core of the machine, each
run in a fresh process. MB/s counts the corpus's text (UTF-8) over the step's wall time, all its stages.

    python benchmarks/cleaning.py                   # 50 MB: ~25 minutes on 2 CPU cores
    python benchmarks/cleaning.py --megabytes 5 --steps exact fineweb
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

FILES = 64  # the library's reader splits work by file: as many as our tasks at this size


def parse():
    from utils.clean import STEPS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--megabytes", type=float, default=50)
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    p.add_argument("--worker", nargs=3, metavar=("WHO", "STEP", "DIR"), help=argparse.SUPPRESS)
    return p.parse_args()


def make_corpus(folder, megabytes):
    import synthetic_text as t

    r, texts, size = random.Random(0), [], 0
    validation = [t.document(r) for _ in range(300)]
    while size < megabytes * 1e6:
        k = len(texts)
        text = (t.exact_copy(texts[k // 2]) if k % 100 == 1 else t.near_copy(texts[k // 3], r) if k % 100 == 2 else
                t.boilerplate() if k % 100 == 3 else t.gibberish(r) if k % 100 == 4 else
                t.with_passage_of(validation[k % 300], r) if k % 100 == 5 else t.document(r)) if k > 10 else t.document(r)
        texts.append(text)
        size += len(text.encode())
    lines = [json.dumps({"text": text}) + "\n" for text in texts]
    (folder / "corpus.jsonl").write_text("".join(lines))
    (folder / "validation.jsonl").write_text("".join(json.dumps({"text": v}) + "\n" for v in validation))
    (folder / "shards").mkdir()
    for i in range(FILES):
        (folder / "shards" / f"{i:03d}.jsonl").write_text("".join(lines[i::FILES]))
    return len(texts), size


def ours(step, folder, workers):
    from utils import clean
    from utils.sources import load_source

    source = {"kind": "files", "files": [str(folder / "corpus.jsonl")], "validation": [str(folder / "validation.jsonl")],
              "label": "corpus", "weight": None, "text_column": "text"}
    sources = [load_source(source)]  # Arrow files written here, outside the timing
    chosen = {"steps": [step], "minhash": {"ngrams": 5, "buckets": 14, "hashes_per_bucket": 8}, "decontaminate_ngrams": 13}
    start = time.perf_counter()
    cleaned, _ = clean.clean(sources, chosen, str(folder / f"ours-{step}"), workers)
    return time.perf_counter() - start, len(cleaned[0]["splits"]["train"])


def library(step, folder, workers):
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.decont import NGramsDecontConfig, NGramsDecontFilter
    from datatrove.pipeline.dedup import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                          MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.dedup.exact_dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature,
                                                      ExactFindDedups)
    from datatrove.pipeline.readers import JsonlReader

    from utils import clean

    work, kept = folder / f"library-{step}", []

    class Count:  # the last step: counts what reaches it (a writer's place)
        def __call__(self, data, rank=0, world_size=1):
            n = sum(1 for _ in data)
            (work / "kept").mkdir(parents=True, exist_ok=True)
            (work / "kept" / f"{rank}").write_text(str(n))
            return iter(())

    def run(pipeline, tasks):
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks), start_method="fork",
                              logging_dir=str(work / "logs" / str(len(kept)))).run()
        kept.append(1)

    def read():
        return JsonlReader(str(folder / "shards"))

    start = time.perf_counter()
    if step == "exact":
        config = ExactDedupConfig(content_getter=clean.normalized_text)
        run([read(), ExactDedupSignature(str(work / "sigs"), config)], FILES)
        run([ExactFindDedups(str(work / "sigs"), str(work / "dups"), config)], 1)
        run([read(), ExactDedupFilter(str(work / "dups"), config), Count()], FILES)
    elif step == "minhash":
        config = MinhashConfig(hash_config=clean.WORD_HASH)
        run([read(), MinhashDedupSignature(str(work / "sigs"), config)], FILES)
        run([MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=config)], config.num_buckets)
        run([MinhashDedupCluster(str(work / "buckets"), str(work / "ids"), config=config)], 1)
        run([read(), MinhashDedupFilter(str(work / "ids")), Count()], FILES)
    elif step == "decontaminate":
        config = NGramsDecontConfig(n_grams=13, hash_config=clean.WORD_HASH)
        run([JsonlReader(str(folder), glob_pattern="validation.jsonl"),
             clean.DecontaminationIndex(str(work / "index"), config)], 1)
        run([read(), NGramsDecontFilter(str(work / "index"), config), Count()], FILES)
    else:
        run([read(), clean.FILTERS[step](), Count()], FILES)
    seconds = time.perf_counter() - start
    return seconds, sum(int(p.read_text()) for p in (work / "kept").iterdir())


def worker(who, step, folder):
    import contextlib

    from loguru import logger

    from utils.clean import cores

    workers = cores()
    with open(Path(folder) / f"{who}-{step}.log", "w") as log, contextlib.redirect_stderr(log):
        logger.remove()
        logger.add(log, level="INFO")
        seconds, kept = (ours if who == "ours" else library)(step, Path(folder), workers)
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(json.dumps({"seconds": seconds, "kept": kept, "peak_mib": peak / 1024}))


def main():
    args = parse()
    if args.worker:
        return worker(*args.worker)
    folder = Path(tempfile.mkdtemp(prefix="clean-bench-"))
    documents, size = make_corpus(folder, args.megabytes)
    from utils.clean import cores

    print(f"corpus: {size / 1e6:.1f} MB, {documents:,} documents; {cores()} cores; datatrove "
          f"{__import__('importlib.metadata').metadata.version('datatrove')}")
    print("| step | ours MB/s | datatrove's own MB/s | ours / own | kept (ours, own) | peak MiB per process (ours, own) |")
    print("|---|---|---|---|---|---|")
    for step in args.steps:
        measured = {}
        for who in ("library", "ours"):
            done = subprocess.run([sys.executable, __file__, "--worker", who, step, str(folder)], capture_output=True,
                                  text=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
            if done.returncode:
                sys.exit(f"{who} {step} failed:\n{done.stderr[-3000:]}")
            measured[who] = json.loads(done.stdout.strip().splitlines()[-1])
        o, l = measured["ours"], measured["library"]
        print(f"| {step} | {size / 1e6 / o['seconds']:.2f} | {size / 1e6 / l['seconds']:.2f} | "
              f"{l['seconds'] / o['seconds']:.2f} | {o['kept']:,}, {l['kept']:,} | "
              f"{o['peak_mib']:.0f}, {l['peak_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
