"""Tokenize once, train anywhere: write a token store that train.py --data_dir memory-maps.

    python prepare_data.py --train_file corpus.jsonl --data_dir /shared/store      # a trained tokenizer
    python prepare_data.py --dataset_name NAME --tokenizer_name gpt2 --data_dir /shared/store
    accelerate launch train.py --data_dir /shared/store ...                          # any number of nodes

The source and tokenizer flags are train.py's and mean the same. An interrupted run, started again
with the same flags, keeps the shards it finished. Layout of a store: utils/store.py.
"""

import json
import os
import time

from accelerate import PartialState

from utils import clean
from utils.config import build_parser, parse_args
from utils.data import document_encoder, load_tokenizer, write_token_store
from utils.errors import UserError, run_cli
from utils.sources import load_source
from utils.store import (CLEANING, MANIFEST, SHARD_DOCUMENTS, check_claimable, check_store, claimed_plan,
                         read_manifest)


def main(argv=None):
    parser = build_parser()
    parser.description = "Tokenize a corpus once into a token store for train.py --data_dir."
    parser.add_argument("--shard_documents", type=int, default=SHARD_DOCUMENTS,
                        help="documents per shard, the unit of work an interrupted run keeps")
    parser.add_argument("--verify", action="store_true",
                        help="check an existing store at --data_dir against its manifest's sha256s, write nothing")
    cleaning = parser.add_argument_group("cleaning before tokenizing (datatrove; utils/clean.py, README 'Cleaning')")
    cleaning.add_argument("--clean", nargs="+", choices=clean.STEPS + ("all",), metavar="STEP",
                          help=f"steps to run, always in this order however listed: {', '.join(clean.STEPS)}; or all")
    cleaning.add_argument("--minhash_ngrams", type=int, default=5, help="minhash: words per shingle")
    cleaning.add_argument("--minhash_buckets", type=int, default=14, help="minhash: LSH bands")
    cleaning.add_argument("--minhash_hashes_per_bucket", type=int, default=8,
                          help="minhash: hashes per band (threshold ~(1/bands)^(1/hashes): 0.72 at 14 x 8)")
    cleaning.add_argument("--decontaminate_ngrams", type=int, default=13,
                          help="decontaminate: words of an n-gram shared with validation that drops a train document")
    args = parse_args(argv, parser, writes_store=True)
    chosen = clean.settings(args, {flag: parser.get_default(flag) for flag in clean.LIMITS})
    if not args.data_dir:
        raise UserError("prepare_data.py needs --data_dir STORE: the directory to write the token store to")
    if args.verify:  # after a copy between filesystems: every byte against the digests recorded when written
        manifest = read_manifest(args.data_dir)
        check_store(args.data_dir, manifest, digests=True)
        return print(f"token store {args.data_dir} verified: {len(manifest['sources'])} source(s), content id "
                     f"{manifest['content_id']}, every shard matches its sha256")
    if args.train_weights:
        raise UserError("prepare_data.py writes every source whole; weights are chosen when training: "
                        "pass --train_weights to train.py --data_dir")
    if args.streaming:
        raise UserError("prepare_data.py reads the whole corpus: drop --streaming")
    claimed = claimed_plan(args.data_dir)  # checked before cleaning, which may take hours
    if claimed is None:
        check_claimable(args.data_dir)
    elif claimed.get("cleaning") != chosen:
        raise UserError(f"{args.data_dir} holds a store cleaned {'otherwise' if claimed.get('cleaning') else 'not at all'}"
                        " (--clean settings, or datatrove's and spaCy's versions): choose an empty --data_dir, or "
                        "run with that store's settings (train.py --data_dir reads it as it is)")
    start = time.perf_counter()
    sources = [load_source(s, args.validation_split_percentage) for s in args.sources]
    raw, record = sources, None
    if chosen:  # the tokenizer trained here learns from the cleaned text
        sources, record = clean.clean(raw, chosen, os.path.join(args.data_dir, CLEANING),
                                      args.preprocessing_num_workers or clean.cores())
    tokenizer = load_tokenizer(args.tokenizer_name or args.model_name_or_path, args.vocab_size, sources, PartialState(),
                               args.tokenizer_sample_documents)
    tokenizer_ready = time.perf_counter()
    if record and not os.path.isfile(os.path.join(args.data_dir, MANIFEST)):
        record = clean.count_removed_tokens(raw, record, os.path.join(args.data_dir, CLEANING),
                                            document_encoder(tokenizer))
    manifest = write_token_store(args.data_dir, sources, tokenizer, args.preprocessing_num_workers,
                                 shard_documents=args.shard_documents, cleaning=record)
    seconds = time.perf_counter() - tokenizer_ready
    for number, source in enumerate(manifest["sources"]):  # train.py --train_weights weighs them in this order
        counts = ", ".join(f"{split} {s['tokens']:,} tokens in {s['documents']:,} documents"
                           for split, s in source["splits"].items())
        print(f"source {number} {source['label']}: {counts}")
        for split, steps in (source.get("cleaning") or {}).items():
            removed = ", ".join(f"{step} {s['documents']:,}" for step, s in steps.items() if isinstance(s, dict))
            print(f"  cleaning {split}: {steps['kept']:,} of {steps['documents']:,} documents kept; removed: {removed}")
    total = sum(s["tokens"] for source in manifest["sources"] for s in source["splits"].values())
    print(json.dumps({"data_dir": args.data_dir, "tokens": total, "content_id": manifest["content_id"],
                      "tokenize_seconds": round(seconds, 2), "total_seconds": round(time.perf_counter() - start, 2)}))
    print(f"token store ready: accelerate launch train.py --data_dir {args.data_dir} ...")


if __name__ == "__main__":
    run_cli(main)
