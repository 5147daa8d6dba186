"""The token store: documents tokenized once into binary shards that every process of every node
memory-maps. `prepare_data.py --data_dir STORE` writes one where you choose; train.py writes the same
kind into its cache when it is given text instead, so both paths train on the same blocks.

    STORE/manifest.json                   written last: a store without it is incomplete
    STORE/tokenizer/                      the tokenizer that made the tokens
    STORE/NN-LABEL/SPLIT/shard-00000.bin  token ids (uint16 when the vocabulary fits, else uint32),
                                          each document followed by EOS
    STORE/NN-LABEL/SPLIT/shard-00000.ends.npy   where each document ends in the shard
    STORE/NN-LABEL/SPLIT/shard-00000.json       written after the two above: the shard is done
    STORE/NN-LABEL/SPLIT/index.npy        tokens, documents and end (tokens up to its end) of every shard
                                          (int64 [shards, 3]), written
                                          with the manifest: readers memory-map it, so opening a store
                                          costs the same at 30 shards and at 300,000

A shard is a fixed range of documents, so an interrupted store resumes with the shards it finished.
"""

import concurrent.futures
import functools
import hashlib
import io
import json
import mmap
import multiprocessing
import os
import re
from itertools import chain

import numpy as np

from utils.errors import UserError
from utils.files import publish, temporary_name, wait_for, write_atomic

FORMAT = 3  # 3: each split's shards in its index.npy, not listed in the manifest; 2: sources record whether
READS = (2, 3)  # their validation split was held out of train (a format-2 store is still read: its shards listed)
INDEX = "index.npy"
MANIFEST = "manifest.json"
PLAN = "plan.json"  # what a store being written holds: a resume must be for the same sources and tokenizer
CLEANING = "cleaning"  # prepare_data.py --clean's work and records (utils/clean.py), written before the plan
SHARD_DOCUMENTS = 50_000  # documents per shard: the unit of resumable work
ENCODE_BATCH = 1_000  # documents per call of the Rust tokenizer, which spreads a batch over every core


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def tokenizer_identity(tokenizer):
    """A hash of the tokenizer's vocabulary, merges, normalization and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{text}|eos={tokenizer.eos_token_id}|n={len(tokenizer)}".encode()).hexdigest()[:16]


def write_store(path, sources, tokenizer, encode, workers=None, shard_documents=SHARD_DOCUMENTS, part=(0, 1),
                cleaning=None):
    """Tokenize `sources` into the store at `path` (resuming its finished shards); returns the manifest.

    sources: [{"label", "identity" (JSON-able), "text_column", "splits": {split: datasets.Dataset}}].
    encode: texts -> token ids of each non-empty text followed by EOS (utils/data.py document_encoder).
    workers: processes that tokenize shards side by side (default: one, whose Rust tokenizer uses every core).
    part: (i, n): this process writes every n-th shard from the i-th, so n processes share the work (a node's
    training processes); part 0 then waits on the filesystem (in no timed collective) for the others' shards
    and writes the manifest; the others return None once theirs are written.
    cleaning: what utils/clean.py removed ({"settings", "sources"}), recorded in the plan (so the content id)
    and per source in the manifest."""
    plan = {"format": FORMAT, "tokenizer": tokenizer_identity(tokenizer), "eos_token_id": tokenizer.eos_token_id,
            "vocab_size": len(tokenizer), "dtype": np.dtype(token_dtype(len(tokenizer))).name,
            "sources": [{"label": s["label"], "identity": s["identity"], "text_column": s["text_column"],
                         "validation": "held_out" if s.get("held_out") else "given",  # held out: the rest trains
                         "documents": {split: len(d) for split, d in s["splits"].items()}} for s in sources],
            "shard_documents": shard_documents, **({"cleaning": cleaning["settings"]} if cleaning else {})}
    _claim(path, plan)
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return read_manifest(path)
    if not os.path.isdir(os.path.join(path, "tokenizer")):
        tmp = temporary_name(os.path.join(path, "tokenizer"))
        tokenizer.save_pretrained(tmp)
        publish(tmp, os.path.join(path, "tokenizer"), keep_existing=True)

    dirs = [f"{number:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', source['label'])[:40]}"
            for number, source in enumerate(sources)]
    jobs, every_shard = [], []  # jobs: (dataset, text column, first document, end, shard path without suffix)
    for source, folder in zip(sources, dirs):
        for split, dataset in source["splits"].items():
            os.makedirs(os.path.join(path, folder, split), exist_ok=True)
            for k, start in enumerate(range(0, len(dataset), shard_documents)):
                base = os.path.join(path, folder, split, shard_name(k))
                if len(every_shard) % part[1] == part[0] and not os.path.isfile(base + ".json"):
                    jobs.append((dataset, source["text_column"], start, min(start + shard_documents, len(dataset)), base))
                every_shard.append(base + ".json")
    dtype = token_dtype(len(tokenizer))
    if workers and workers > 1 and len(jobs) > 1:  # fork: each worker's Rust tokenizer runs single-threaded
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            for done in [pool.submit(_write_shard, *job, encode, dtype) for job in jobs]:
                done.result()
    else:
        for job in jobs:
            _write_shard(*job, encode, dtype)
    if part[0] != 0:
        return None
    wait_for(every_shard, "shards that this node's other processes are tokenizing")

    manifest, every_digest = {**plan, "sources": []}, []
    for number, (source, planned, folder) in enumerate(zip(sources, plan["sources"], dirs)):
        splits, digests = {}, []
        for split in source["splits"]:
            split_dir = os.path.join(path, folder, split)
            names = sorted((n for n in os.listdir(split_dir) if n.endswith(".json") and n.startswith("shard-")),
                           key=shard_number)
            shards = [_read_json(os.path.join(split_dir, name)) for name in names]
            index = _index([s["tokens"] for s in shards], [s["documents"] for s in shards])
            save_npy(os.path.join(split_dir, INDEX), index)
            splits[split] = {"shards": len(shards), "tokens": int(index[:, 0].sum()), "documents": int(index[:, 1].sum())}
            digests += [s["sha256"] for s in shards]
        manifest["sources"].append({**planned, "dir": folder, "splits": splits,
                                    "content": content_hash(planned["validation"], digests)})
        if cleaning:  # per split and step: documents and tokens removed, by reason
            manifest["sources"][-1]["cleaning"] = {
                split: {step: {k: v for k, v in s.items() if k != "rows"} if isinstance(s, dict) else s
                        for step, s in steps.items()} for split, steps in cleaning["sources"][number].items()}
        every_digest.append(digests)
    manifest["content_id"] = hashlib.sha256(json.dumps([plan["tokenizer"], every_digest] + (
        [plan["cleaning"]] if cleaning else [])).encode()).hexdigest()[:16]
    write_atomic(os.path.join(path, MANIFEST), json.dumps(manifest, indent=2))
    return manifest


def content_hash(validation, digests):
    """What a store's source holds (its shards' sha256s, and whether its validation was held out of train):
    a checkpoint's resume compares it."""
    return hashlib.sha256(json.dumps([validation, digests]).encode()).hexdigest()[:16]


def source_content(path, manifest, source_number):
    """content_hash of a source, as recorded (format 3) or from the shards the manifest lists (format 2)."""
    source = manifest["sources"][source_number]
    if "content" in source:
        return source["content"]
    return content_hash(source["validation"], [s["sha256"] for split in source["splits"].values()
                                               for s in split["shards"]])


def shard_name(k, names=None):
    """The file name (no suffix) of a split's k-th shard: shard-k, or what a format-2 manifest listed."""
    return names[k] if names else f"shard-{k:05d}"


def save_npy(path, array):
    """An .npy file written in one step (utils/files.py write_atomic)."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_atomic(path, buffer.getvalue())


def shard_number(name):
    """The k of "shard-k.json": the order of a split's shards (by name, shard-100000 would precede shard-99999)."""
    return int(name.split(".")[0].split("-")[1])


def _claim(path, plan):
    """Record what this store holds; a store begun for other sources or another tokenizer is refused."""
    os.makedirs(path, exist_ok=True)
    plan_file = os.path.join(path, PLAN)
    if not os.path.isfile(plan_file):
        check_claimable(path)
        tmp = temporary_name(plan_file)
        with open(tmp, "w") as f:
            json.dump(plan, f, indent=2)
        publish(tmp, plan_file, keep_existing=True)  # several nodes may claim a shared cache at once
    claimed = _read_json(plan_file)
    if claimed.get("format") != plan["format"]:
        raise UserError(f"{path} holds a store of format {claimed.get('format')} (train.py --data_dir still reads a "
                        f"finished one); this code writes format {plan['format']}: write it to a new --data_dir")
    if claimed != json.loads(json.dumps(plan)):
        raise UserError(f"{path} holds a store of other sources or another tokenizer: choose an empty "
                        "--data_dir, or delete that one")


def check_claimable(path):
    """A store can be begun at `path`: it is new, empty, or holds only prepare_data.py's cleaning (and a peer's
    PLAN.tmp... while it claims it); a plan there means a store begun, which _claim compares."""
    if not os.path.exists(path) or os.path.isfile(os.path.join(path, PLAN)):
        return
    if not os.path.isdir(path) or any(not name.startswith(PLAN) and name != CLEANING for name in os.listdir(path)):
        raise UserError(f"{path} is not empty and holds no token store: choose an empty or new --data_dir")


def claimed_plan(path):
    """What the store at `path` was begun for (its plan), or None if none was."""
    plan_file = os.path.join(path, PLAN)
    return _read_json(plan_file) if os.path.isfile(plan_file) else None


def _write_shard(dataset, text_column, start, end, base, encode, dtype):
    texts = dataset.select_columns([text_column])
    digest, total, ends = hashlib.sha256(), 0, []
    tmp = temporary_name(base + ".bin")
    with open(tmp, "wb") as f:
        for first in range(start, end, ENCODE_BATCH):
            ids = encode(texts[first:min(first + ENCODE_BATCH, end)][text_column])
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            tokens = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
            ends.append(total + np.cumsum(lengths))
            total += len(tokens)
            data = tokens.tobytes()
            digest.update(data)
            f.write(data)
    publish(tmp, base + ".bin")
    ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    save_npy(base + ".ends.npy", ends)
    write_atomic(base + ".json", json.dumps({"name": os.path.basename(base), "tokens": total,
                                             "documents": len(ends), "sha256": digest.hexdigest()}))


def read_manifest(path):
    manifest_file = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_file):
        if os.path.isfile(os.path.join(path, PLAN)):
            raise UserError(f"token store {path} is incomplete (no {MANIFEST}): run prepare_data.py with the same "
                            "flags again, which finishes it")
        raise UserError(f"{path} is not a token store (no {MANIFEST}): write one with prepare_data.py --data_dir")
    manifest = _read_json(manifest_file)
    if manifest.get("format") not in READS:
        raise UserError(f"token store {path} has format {manifest.get('format')}, this code reads "
                        f"{' and '.join(map(str, READS))}: prepare it again")
    return manifest


def check_store(path, manifest, digests=False):
    """Every shard of the store is there with the size its index records (one stat per shard: a second
    at 100,000 shards, so train.py runs it on the main process only; every process checks each shard's size
    again when it maps it); with `digests`, its sha256 and document ends too (reads every byte: for stores
    copied between filesystems)."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for number, source in enumerate(manifest["sources"]):
        for split in source["splits"]:
            table = shard_table(path, manifest, number, split)
            sums = shard_digests(path, manifest, number, split) if digests else None
            names = shard_names(manifest, number, split)
            for k, tokens in enumerate(table[:, 0].tolist()):
                shard = shard_name(k, names)
                name = f"{source['dir']}/{split}/{shard}"
                base = os.path.join(path, name)
                expected = tokens * itemsize
                try:
                    size = os.stat(base + ".bin").st_size
                except OSError:
                    size = None
                problem = ("is missing" if size is None else
                           f"has {size:,} bytes where the index records {expected:,}" if size != expected else
                           "does not match its sha256" if digests and _sha256(base + ".bin") != sums[k] else
                           f"has no {shard}.ends.npy" if digests and not os.path.isfile(base + ".ends.npy")
                           else None)
                if problem:
                    raise _damaged(path, f"{name}.bin {problem}")


def shard_table(path, manifest, source_number, split):
    """Tokens, documents and end of each shard of a split (int64 [shards, 3]): its index.npy memory-mapped
    (format 3: nothing per shard in memory), or read from the manifest's shard list (format 2)."""
    source = manifest["sources"][source_number]
    recorded = source["splits"][split]["shards"]
    if not isinstance(recorded, int):
        return _index([s["tokens"] for s in recorded], [s["documents"] for s in recorded])
    if recorded == 0:
        return np.zeros((0, 3), np.int64)
    file = os.path.join(path, source["dir"], split, INDEX)
    try:
        table = np.load(file, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise _damaged(path, f"{source['dir']}/{split}/{INDEX} cannot be read ({type(e).__name__})") from e
    if table.shape != (recorded, 3):
        raise _damaged(path, f"{source['dir']}/{split}/{INDEX} lists {table.shape[0]} shards, the manifest {recorded}")
    return table


def _index(tokens, documents):
    """A split's index: per shard its tokens, documents and end (the tokens up to its end), int64 [shards, 3]."""
    tokens = np.asarray(tokens, dtype=np.int64)
    return np.stack([tokens, np.asarray(documents, dtype=np.int64), np.cumsum(tokens)], axis=1).reshape(-1, 3)


def shard_digests(path, manifest, source_number, split):
    """The sha256 of each shard of a split (format 3: from each shard's .json; reads one file per shard)."""
    source = manifest["sources"][source_number]
    recorded = source["splits"][split]["shards"]
    if not isinstance(recorded, int):
        return [s["sha256"] for s in recorded]
    folder = os.path.join(path, source["dir"], split)
    try:
        return [_read_json(os.path.join(folder, shard_name(k) + ".json"))["sha256"] for k in range(recorded)]
    except (OSError, ValueError, KeyError) as e:
        raise _damaged(path, f"a shard record of {source['dir']}/{split} cannot be read ({type(e).__name__})") from e


def _damaged(path, problem):
    return UserError(f"token store {path} is damaged: {problem}: copy the store again, or delete it and prepare it again")


def _sha256(file):
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def split_tokens(path, manifest, source_number, split):
    """The tokens of one source's split, its shards end to end (a ShardTable: nothing is read yet)."""
    source = manifest["sources"][source_number]
    table = shard_table(path, manifest, source_number, split)
    return ShardTable(os.path.join(path, source["dir"], split), manifest["dtype"], table[:, 2],
                      shard_names(manifest, source_number, split))


def shard_names(manifest, source_number, split):
    """The shards' file names in a format-2 manifest's order (which listed them by name: past shard-99999
    not by number); None for format 3 (shard-k is the k-th)."""
    recorded = manifest["sources"][source_number]["splits"][split]["shards"]
    return None if isinstance(recorded, int) else [s["name"] for s in recorded]


OPEN_SHARDS = 64  # memory-mapped shard files per process at once: a 1T-token store has ~30,000 shards


@functools.lru_cache(maxsize=OPEN_SHARDS)
def _mapped(filename, dtype, tokens):
    """A shard file memory-mapped, read-only (a mapping holds a file descriptor, so only the most recently
    read OPEN_SHARDS stay open: thousands of shards stay within `ulimit -n`); its size is checked against
    the `tokens` its index records (a shard cut short by a copy is refused, not read short)."""
    if tokens == 0:  # a shard of empty documents only: nothing to map (an empty file cannot be)
        return np.zeros(0, dtype)
    try:
        with open(filename, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read token store shard {filename} ({getattr(e, 'strerror', None) or type(e).__name__}): "
                        "check the file and its permissions, or copy the store again") from e
    if len(mapping) != tokens * np.dtype(dtype).itemsize:
        raise UserError(f"token store shard {filename} has {len(mapping):,} bytes where its index records "
                        f"{tokens * np.dtype(dtype).itemsize:,}: copy the store again, or prepare it again")
    if hasattr(mmap, "MADV_RANDOM"):  # training reads blocks in random order: read the pages asked for, not the
        mapping.madvise(mmap.MADV_RANDOM)  # read_ahead_kb around each (often MBs: 40x slower per block, measured)
    return np.frombuffer(mapping, dtype=dtype)


def clear_mapped_shards():
    _mapped.cache_clear()


class ShardTable:
    """A split's shards read as one sequence of tokens (len, and slices with step 1), each shard mapped
    only while it is read (through _mapped's bounded cache). `ends` (each shard's end) is a column of the
    memory-mapped index: nothing per shard is held in the process's memory, whatever the shard count."""

    def __init__(self, folder, dtype, ends, names=None):
        self.folder, self.dtype, self.names, self.ends = folder, np.dtype(dtype), names, ends

    def name(self, k):
        return shard_name(k, self.names)

    def __len__(self):
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index):
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("a token sequence reads contiguous slices only")
        start, stop, _ = index.indices(len(self))
        pieces, k = [], int(np.searchsorted(self.ends, start, side="right"))
        while start < stop:
            first = int(self.ends[k - 1]) if k else 0
            end = int(self.ends[k])
            shard = _mapped(os.path.join(self.folder, self.name(k) + ".bin"), self.dtype.name, end - first)
            pieces.append(shard[start - first:min(stop, end) - first])
            start, k = min(stop, end), k + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else np.zeros(0, self.dtype)

    def document_boundary(self, position):
        """The first document end at or after token `position` (its length if none): so tokens [0, result)
        are whole documents. Reads one shard's document ends."""
        if position >= len(self):
            return len(self)
        k = int(np.searchsorted(self.ends, position, side="left"))
        first = int(self.ends[k - 1]) if k else 0
        ends_file = os.path.join(self.folder, self.name(k) + ".ends.npy")
        try:
            ends = np.load(ends_file)
        except (OSError, ValueError) as e:
            raise UserError(f"token store shard {ends_file} cannot be read ({type(e).__name__}): copy the store "
                            "again, or prepare it again") from e
        return first + int(ends[np.searchsorted(ends, position - first)])


class TokenView:
    """Tokens [first, end) of a sequence (a ShardTable), nothing read until sliced."""

    def __init__(self, tokens, first, end):
        self.tokens, self.first, self.end = tokens, first, max(first, end)

    def __len__(self):
        return self.end - self.first

    def __getitem__(self, index):
        start, stop, _ = index.indices(len(self))
        return self.tokens[self.first + start:self.first + max(start, stop)]


def join_tokens(parts):
    """Token sequences (arrays, ShardTables, TokenViews) read as one; empty ones dropped, nothing copied."""
    parts = [p for p in parts if len(p)]
    return parts[0] if len(parts) == 1 else ShardedTokens(parts) if parts else np.zeros(0, np.uint16)


class ShardedTokens:
    """Several token sequences read as one sequence of tokens (len and slices with step 1)."""

    def __init__(self, shards):
        self.shards = shards
        self.starts = np.concatenate([[0], np.cumsum([len(s) for s in shards])])

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, index):
        start, stop, _ = index.indices(len(self))
        first = max(int(np.searchsorted(self.starts, start, side="right")) - 1, 0)
        pieces = []
        for k in range(first, len(self.shards)):
            if self.starts[k] >= stop:
                break
            pieces.append(self.shards[k][max(start - self.starts[k], 0):stop - self.starts[k]])
        return np.concatenate(pieces) if pieces else np.zeros(0, np.uint16)
