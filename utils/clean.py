"""Cleaning a corpus before it is tokenized (prepare_data.py --clean STEP ...): Hugging Face datatrove's own
steps, run by its local executor over the documents where they lie (the sources' Arrow files, no copy of the
text). This module is only the glue: which documents each task reads, which each step removed and why.

The steps, always in this order however they are listed (each opt-in):
  exact              the same text after lowercasing, Unicode NFKC and whitespace folding, within and across
                     sources: the first copy is kept (sources as listed, documents in order)
                     (datatrove ExactDedup*, 3 stages)
  gopher_repetition  Gopher's repeated lines, paragraphs and n-grams (Rae et al. 2021, table A1)
  gopher_quality     Gopher's word count, word length, symbols, bullets, ellipses, alphabetic words, stop words
  c4                 C4's document rules (Raffel et al. 2020): fewer than 5 sentences in lines that end in
                     punctuation, "lorem ipsum", a curly bracket. Its line edits are not applied: a kept document
                     is stored whole, so every token in the store is a document's own text
  fineweb            FineWeb's rules (Penedo et al. 2024): lines ending in punctuation, short lines, duplicated
                     lines, list-like documents
  minhash            near duplicates: MinHash of word 5-grams in 14 bands of 8 hashes, FineWeb's setting (a pair
                     whose 5-gram Jaccard similarity is 0.75 is caught with probability 0.77, 0.8 with 0.92, 0.9
                     with 1.00); one document of each cluster is kept   (datatrove MinhashDedup*, 4 stages)
  decontaminate      a train document sharing a 13-word n-gram with any validation document (GPT-3's rule,
                     Brown et al. 2020; words after datatrove's normalization)   (datatrove NGramsDecontFilter)
Quality filters run before MinHash, as in FineWeb: near duplicates are looked for among documents kept anyway.
Every filter uses datatrove's published defaults and its English word tokenizer (spaCy's rules, no model).

What is cleaned: every source's train split, and a validation split held out of it (--validation_split_percentage:
the same corpus) by every step but decontamination. A validation split that is given (a file, a Hub split) is
never touched. Work happens in STORE/cleaning: a task is a fixed range of one split's documents, each datatrove
stage skips the tasks it finished (an interrupted run resumes), and the signatures are deleted at the end.
"""

import contextlib
import hashlib
import itertools
import json
import math
import os
import shutil
import time
import unicodedata
from dataclasses import dataclass
from importlib.metadata import version

import numpy as np
import pyarrow as pa
from datasets import Dataset
from datasets.table import MemoryMappedTable
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.decont import NGramsDecontConfig, NGramsDecontFilter
from datatrove.pipeline.dedup import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                      MinhashDedupSignature)
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups
from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                        GopherRepetitionFilter)
from datatrove.utils.hashing import HashConfig, create_hash_func
from datatrove.utils.text import ngrams, simplify_text
from datatrove.utils.word_tokenizers import load_word_tokenizer
from loguru import logger

from utils.errors import UserError
from utils.files import publish, temporary_name, write_atomic
from utils.store import save_npy

STEPS = ("exact", "gopher_repetition", "gopher_quality", "c4", "fineweb", "minhash", "decontaminate")


class C4Rules(C4QualityFilter):
    """datatrove's C4 filter deciding which documents go; the lines it would cut from a kept one stay (for the
    store, and for the steps after it)."""

    def filter(self, doc):
        text = doc.text
        try:
            return super().filter(doc)
        finally:
            doc.text = text


FILTERS = {"gopher_repetition": GopherRepetitionFilter, "gopher_quality": GopherQualityFilter, "c4": C4Rules,
           "fineweb": FineWebQualityFilter}
LIMITS = {"minhash_ngrams": (1, 50), "minhash_buckets": (1, 64), "minhash_hashes_per_bucket": (1, 64),
          "decontaminate_ngrams": (4, 50)}
WORD_HASH = HashConfig(precision=64, hash_fc="sha1")  # n-grams are str, which xxhash 4 (datasets') no longer hashes
TASK_DOCUMENTS = (1_000, 200_000)  # a task's documents: the corpus / 64 within these bounds
MERGE_TASKS = 64  # exact and MinHash signatures are merged by one task per this many tasks (at most 16; MinHash: per band)
SAMPLE = 10  # removed documents per source and step written to removed_sample.jsonl
READ_BATCH = 1_000
INDEX = "index.npy"  # the decontamination index: every validation n-gram's hash, sorted


def settings(args, defaults):
    """The cleaning settings of prepare_data.py's flags (None without --clean); a bad one fails in one line.
    defaults: the flags' defaults (a setting changed for a step not asked for is refused)."""
    steps = [s for s in STEPS if s in (args.clean or []) or "all" in (args.clean or [])]
    for flag, (low, high) in LIMITS.items():
        value = getattr(args, flag)
        if not low <= value <= high:
            raise UserError(f"--{flag} must be between {low} and {high} (got {value})")
        step = flag.split("_")[0] if flag.startswith("minhash") else "decontaminate"
        if step not in steps and value != defaults[flag]:
            raise UserError(f"--{flag} sets the {step} step, which is not asked for: add {step} to --clean")
    if not steps:
        return None
    chosen = {"steps": steps, "datatrove": version("datatrove"), "spacy": version("spacy")}
    if "minhash" in steps:
        chosen["minhash"] = {k: getattr(args, f"minhash_{k}") for k in ("ngrams", "buckets", "hashes_per_bucket")}
    if "decontaminate" in steps:
        chosen["decontaminate_ngrams"] = args.decontaminate_ngrams
    return chosen


@dataclass(frozen=True)
class Task:
    """Documents [start, end) of one split of one source: the unit of work every stage resumes by."""
    source: int
    split: str
    start: int
    end: int


def cores():
    """The cores this process may run on (all of them where the OS cannot say)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def plan_tasks(sources, splits):
    """The tasks over `splits` ((source number, split) pairs), a fixed number of documents each: fixed by the
    corpus alone (not the cores), so a resume on another machine finds the same tasks."""
    total = sum(len(sources[s]["splits"][split]) for s, split in splits)
    size = min(TASK_DOCUMENTS[1], max(TASK_DOCUMENTS[0], math.ceil(total / 64)))
    return [Task(s, split, start, min(start + size, len(sources[s]["splits"][split])))
            for s, split in splits for start in range(0, len(sources[s]["splits"][split]), size)]


class Rows(PipelineStep):
    """datatrove's reader here: the documents of task `rank`, all or those a step before kept (`alive`)."""
    name = "rows of a split"
    type = "📖 - READER"

    def __init__(self, sources, tasks, alive=None, only=None):
        super().__init__()
        self.splits = [{split: (d.select_columns([s["text_column"]]), s["text_column"])
                        for split, d in s["splits"].items()} for s in sources]
        self.tasks, self.alive, self.only = tasks, alive, only  # only: a split name (other tasks read nothing)

    def run(self, data=None, rank=0, world_size=1):
        task = self.tasks[rank]
        if self.only and task.split != self.only:
            return
        dataset, column = self.splits[task.source][task.split]
        rows = np.arange(task.start, task.end) if self.alive is None else np.load(_task_file(self.alive, rank, ".npy"))
        for first in range(0, len(rows), READ_BATCH):
            batch = rows[first:first + READ_BATCH]
            contiguous = len(batch) and batch[-1] - batch[0] == len(batch) - 1
            texts = dataset[int(batch[0]):int(batch[-1]) + 1] if contiguous else dataset[batch.tolist()]
            for row, text in zip(batch.tolist(), texts[column]):
                self.stat_update("documents")
                yield Document(text=text or "", id=f"{task.source}/{task.split}/{row}",
                               metadata={"row": row, "split": task.split, "task": rank})


class Kept(PipelineStep):
    """Passes the documents on and records, once the task's stream ends, the rows that reached it."""
    name = "kept rows"
    type = "💽 - WRITER"

    def __init__(self, folder):
        super().__init__()
        self.folder = folder

    def run(self, data, rank=0, world_size=1):
        rows = []
        for doc in data:
            rows.append(doc.metadata["row"])
            yield doc
        _save_rows(_task_file(self.folder, rank, ".npy"), np.asarray(rows, dtype=np.int64))


class Removed:
    """A step's exclusion_writer (datatrove's interface: a context manager with write(doc, rank)): the rows
    it removed in a task, and why, written when the task's stream ends."""

    def __init__(self, folder, step):
        self.folder, self.step = folder, step

    def __enter__(self):
        self.rows, self.reasons, self.rank = [], [], None
        return self

    def write(self, doc, rank=0):
        self.rows.append(doc.metadata["row"])
        self.reasons.append(doc.metadata.get("filter_reason") or self.step)
        self.rank = rank

    def __exit__(self, kind, *_):
        if kind is None and self.rank is not None:
            _write(_task_file(os.path.join(self.folder, self.step), self.rank, ".json"),
                   json.dumps({"rows": self.rows, "reasons": self.reasons}))


class DecontaminationIndex(PipelineStep):
    """The hashed n-grams of a validation task's documents, as datatrove's NGramsDecontIndexer writes them
    (which itself needs lighteval and its benchmarks: the same three lines, for our own validation text)."""
    name = "n-gram index"
    type = "🦠 - DECONT"

    def __init__(self, folder, config):
        super().__init__()
        self.folder, self.config = folder, config

    def run(self, data, rank=0, world_size=1):
        words, hash_ngram, hashes = load_word_tokenizer("en"), create_hash_func(self.config.hash_config), []
        for doc in data:  # 8 bytes per n-gram (a Python set of them: ~70)
            tokens = words.word_tokenize(simplify_text(doc.text, self.config.norm_config))
            hashes.append(np.fromiter(map(hash_ngram, map(" ".join, ngrams(tokens, self.config.n_grams))), np.uint64))
        unique = np.unique(np.concatenate(hashes)) if hashes else np.zeros(0, np.uint64)
        _write(_task_file(self.folder, rank, ".index.hashes"), unique.tobytes())


class Bands(MinhashDedupBuckets):
    """datatrove's MinHash stage 2; a band merged by several tasks is split into hash ranges by its largest
    signature file (datatrove takes the first, task 0's: a held-out split of a few documents, or none)."""

    def get_worker_hash_range(self, sig_files, rank, world_size):
        largest = [max(sig_files, key=self.input_folder.size)] if sig_files else sig_files
        return super().get_worker_hash_range(largest, rank, world_size)


class TrainDecontamination(NGramsDecontFilter):
    """datatrove's n-gram decontamination for train documents (a held-out validation split is the index), its
    index one sorted array, memory-mapped and looked up a document at a time (datatrove's is a dict built
    again in every task, ~100 bytes per validation n-gram, looked up an n-gram at a time)."""

    def load_index_hashes(self):
        self._index_hashes = np.load(os.path.join(self.index_folder.path, INDEX), mmap_mode="r")

    def filter(self, doc):  # datatrove's filter(), its lookups as one searchsorted
        if doc.metadata["split"] != "train":
            return True
        if self._index_hashes is None:
            self.load_index_hashes()
        words = self.tokenizer.word_tokenize(simplify_text(doc.text, self.config.norm_config))
        grams = [" ".join(gram) for gram in ngrams(words, self.config.n_grams)]
        hashes = np.fromiter(map(self.hash_func, grams), dtype=np.uint64, count=len(grams))
        index = self._index_hashes
        at = np.minimum(np.searchsorted(index, hashes), len(index) - 1) if len(index) else None
        found = np.flatnonzero(index[at] == hashes) if at is not None and len(hashes) else ()
        if len(found):
            doc.metadata["contaminated_ngram"] = grams[found[0]]
            self.stat_update("contaminated_validation")
            return False, "contaminated"
        return True


def _merge_index(folder):
    """The tasks' n-gram hashes as one sorted array without repeats (folder/INDEX)."""
    parts = [np.fromfile(os.path.join(root, name), dtype=np.uint64) for root, _, names in os.walk(folder)
             for name in sorted(names) if name.endswith(".index.hashes")]
    save_npy(os.path.join(folder, INDEX), np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64))


def normalized_text(doc: Document) -> bytes:
    """What exact deduplication compares: the text lowercased, NFKC-normalized, its whitespace folded (bytes:
    xxhash 4 hashes no str)."""
    return " ".join(unicodedata.normalize("NFKC", doc.text).lower().split()).encode()


def listed_first(doc: Document) -> int:
    """Exact deduplication keeps the copy of highest priority, and within one the first of its task: so the
    first copy in the tasks' order (sources as listed, a held-out validation split before train, documents in
    order), for the first 65,534 tasks (3 billion documents)."""
    return max(1, 65535 - doc.metadata["task"])


def clean(sources, chosen, folder, workers):
    """Clean `sources` (utils/sources.py load_source) as `chosen` (settings()) with datatrove in `folder`;
    returns (the sources with their cleaned splits, {"settings", "sources": [per split and step: documents
    removed, by reason]}) and writes removed_sample.jsonl there. A finished cleaning is read back."""
    splits = [(n, split) for n, s in enumerate(sources) for split in ("validation", "train")  # in this order
              if split == "train" or s.get("held_out")]
    tasks = plan_tasks(sources, splits)
    identity = {"settings": chosen, "sources": [s["identity"] for s in sources],
                "text_columns": [s["text_column"] for s in sources],  # and each split's content, validation's too:
                "splits": [{k: getattr(d, "_fingerprint", None) for k, d in s["splits"].items()} for s in sources],
                "documents": [{k: len(d) for k, d in s["splits"].items()} for s in sources],
                "tasks": [len(tasks), tasks[0].end - tasks[0].start if tasks else 0]}
    _claim(folder, identity)
    done = os.path.join(folder, "done.json")
    if not os.path.isfile(done):
        _open_files_for(len(tasks))
        _run_steps(sources, chosen, folder, tasks, workers)
        record = _collect(sources, chosen, folder, tasks)
        _write_sample(sources, record, folder)
        write_atomic(done, json.dumps(record, indent=1))
    shutil.rmtree(os.path.join(folder, "work"), ignore_errors=True)  # signatures: ~1 KB per document
    with open(done) as f:
        record = json.load(f)
    cleaned = []
    for n, source in enumerate(sources):
        out = dict(source, splits=dict(source["splits"]))
        for split, kept in record["kept"][n].items():
            out["splits"][split] = _kept_rows(source["splits"][split], os.path.join(folder, kept),
                                              f"{identity_hash(identity)}-{n}-{split}")
            if len(out["splits"][split]) == 0:
                raise UserError(f"cleaning removed every document of the {split} split of {source['label']} (see "
                                f"{folder}/done.json): drop that source, or delete {folder} and clean with other steps")
        cleaned.append(out)
    return cleaned, {"settings": chosen, "sources": record["sources"]}


def _run_steps(sources, chosen, folder, tasks, workers):
    steps, work = chosen["steps"], os.path.join(folder, "work")
    removed = os.path.join(folder, "removed")

    def run(name, pipeline, count):  # datatrove's logs (a table per task) go to STORE/cleaning/log.txt
        start = time.perf_counter()
        with open(os.path.join(folder, "log.txt"), "a") as log, contextlib.redirect_stderr(log):
            logger.remove()  # loguru's sinks hold the stderr of their time: datatrove's summaries, to the log too
            logger.add(log, level="INFO")
            try:
                LocalPipelineExecutor(pipeline, tasks=count, workers=max(1, min(workers, count)), start_method="fork",
                                      logging_dir=os.path.join(work, "logs", name), skip_completed=True).run()
            finally:
                logger.remove()
        print(f"cleaning: {name} done ({count} task{'s' if count > 1 else ''}, {time.perf_counter() - start:.1f} s)")

    exact = ExactDedupConfig(content_getter=normalized_text, document_priority=listed_first)
    mergers = min(16, max(1, len(tasks) // MERGE_TASKS))  # tasks merging signatures: fixed by the corpus, not the cores
    if "exact" in steps:
        run("exact-1", [Rows(sources, tasks), ExactDedupSignature(os.path.join(work, "exact-sigs"), exact,
                                                                  finder_workers=mergers)], len(tasks))
        run("exact-2", [ExactFindDedups(os.path.join(work, "exact-sigs"), os.path.join(work, "exact-dups"), exact)],
            mergers)
    lsh = chosen.get("minhash", {"ngrams": 5, "buckets": 14, "hashes_per_bucket": 8})
    minhash = MinhashConfig(n_grams=lsh["ngrams"], num_buckets=lsh["buckets"],
                            hashes_per_bucket=lsh["hashes_per_bucket"], hash_config=WORD_HASH)
    first = [ExactDedupFilter(os.path.join(work, "exact-dups"), exact, exclusion_writer=Removed(removed, "exact"))
             if step == "exact" else FILTERS[step](exclusion_writer=Removed(removed, step))
             for step in steps if step not in ("minhash", "decontaminate")]
    alive = None
    if first or "minhash" in steps:
        alive = os.path.join(folder, "kept", "first")
        run("first", [Rows(sources, tasks), *first, Kept(alive)]
            + ([MinhashDedupSignature(os.path.join(work, "minhash-sigs"), minhash)] if "minhash" in steps else []),
            len(tasks))
    if "minhash" in steps:
        run("minhash-2", [Bands(os.path.join(work, "minhash-sigs"), os.path.join(work, "minhash-buckets"),
                                config=minhash)], minhash.num_buckets * mergers)
        run("minhash-3", [MinhashDedupCluster(os.path.join(work, "minhash-buckets"), os.path.join(work, "minhash-ids"),
                                              config=minhash)], 1)
    second = [MinhashDedupFilter(os.path.join(work, "minhash-ids"), exclusion_writer=Removed(removed, "minhash"))] \
        if "minhash" in steps else []
    if "decontaminate" in steps:
        decont = NGramsDecontConfig(n_grams=chosen["decontaminate_ngrams"], hash_config=WORD_HASH)
        index, held_out = os.path.join(work, "decontamination-index"), [t.split == "validation" for t in tasks]
        given = [(n, "validation") for n, s in enumerate(sources) if not s.get("held_out")]
        if given:  # a validation split given whole: every document of it
            given_tasks = plan_tasks(sources, given)
            run("index-given", [Rows(sources, given_tasks), DecontaminationIndex(os.path.join(index, "given"), decont)],
                len(given_tasks))
        if any(held_out):  # held out of train: what the steps before kept of it (tasks numbered as the others)
            run("index-held-out", [Rows(sources, tasks, alive, only="validation"), DecontaminationIndex(os.path.join(index, "held-out"),
                                                                                      decont)], len(tasks))
        _merge_index(index)
        second.append(TrainDecontamination(index, decont, exclusion_writer=Removed(removed, "decontaminate")))
    if second:
        run("second", [Rows(sources, tasks, alive), *second, Kept(os.path.join(folder, "kept", "second"))], len(tasks))


def _collect(sources, chosen, folder, tasks):
    """Each split's kept rows (one .npy per split, from the last pass's per-task lists) and removals by step."""
    last = "second" if {"minhash", "decontaminate"} & set(chosen["steps"]) else "first"
    kept = [{} for _ in sources]
    stats = [{} for _ in sources]
    for n, split in dict.fromkeys((t.source, t.split) for t in tasks):
        ranks = [r for r, t in enumerate(tasks) if (t.source, t.split) == (n, split)]
        name = os.path.join("kept", f"{n:02d}-{split}.npy")
        count = _concatenate([_task_file(os.path.join(folder, "kept", last), r, ".npy") for r in ranks],
                             os.path.join(folder, name))
        kept[n][split] = name
        split_stats = {"documents": len(sources[n]["splits"][split]), "kept": count}
        for step in chosen["steps"]:
            removals = [_read_removed(folder, step, r) for r in ranks]
            reasons = {}
            for reason in (x for r in removals for x in r["reasons"]):
                reasons[reason] = reasons.get(reason, 0) + 1
            split_stats[step] = {"documents": sum(len(r["rows"]) for r in removals), "reasons": reasons,
                                 "rows": [os.path.relpath(_task_file(os.path.join(folder, "removed", step), r, ".json"),
                                                          folder) for r in ranks]}
        stats[n][split] = split_stats
    return {"kept": kept, "sources": stats}


def removals(folder, step_stats):
    """(row, reason) of each document a step removed from a split, in order, read one task's file at a time."""
    for file in step_stats["rows"]:
        removed = _read_removed_file(os.path.join(folder, file))
        yield from zip(removed["rows"], removed["reasons"])


def removed_rows(folder, step_stats):
    return [row for row, _ in removals(folder, step_stats)]


def count_removed_tokens(sources, record, folder, encode):
    """`sources` as given to clean() (not cleaned). Adds "tokens" (what the store would have held: each document's tokens and its EOS) to each step's
    removals in `record`, by tokenizing the removed documents."""
    for n, source in enumerate(sources):
        for split, split_stats in record["sources"][n].items():
            raw = source["splits"][split].select_columns([source["text_column"]])
            for step in record["settings"]["steps"]:
                rows, tokens = removals(folder, split_stats[step]), 0
                while batch := [row for row, _ in itertools.islice(rows, READ_BATCH)]:
                    tokens += sum(map(len, encode(raw[batch][source["text_column"]])))
                split_stats[step]["tokens"] = tokens
    return record


def _write_sample(sources, record, folder):
    """removed_sample.jsonl: up to SAMPLE documents per source, split and step, spread over what it removed."""
    lines = []
    for n, source in enumerate(sources):
        for split, split_stats in record["sources"][n].items():
            raw = source["splits"][split]
            for step, step_stats in split_stats.items():
                if not isinstance(step_stats, dict):
                    continue
                every = max(1, math.ceil(step_stats["documents"] / SAMPLE))
                for row, reason in itertools.islice(removals(folder, step_stats), 0, None, every):
                    lines.append(json.dumps({"source": source["label"], "split": split, "step": step,
                                             "reason": reason, "row": row, "text": raw[row][source["text_column"]]}))
    write_atomic(os.path.join(folder, "removed_sample.jsonl"), "".join(line + "\n" for line in lines))


def _read_removed(folder, step, rank):
    return _read_removed_file(_task_file(os.path.join(folder, "removed", step), rank, ".json"))


def _read_removed_file(path):
    if not os.path.isfile(path):  # nothing removed in that task
        return {"rows": [], "reasons": []}
    with open(path) as f:
        return json.load(f)


def _claim(folder, identity):
    """STORE/cleaning is for one corpus and one set of settings: another's is refused before any work."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "identity.json")
    if os.path.isfile(path):
        with open(path) as f:
            if json.load(f) != json.loads(json.dumps(identity)):
                raise UserError(f"{folder} holds a cleaning of other sources or other --clean settings: choose an "
                                "empty --data_dir, or delete that one")
    else:
        write_atomic(path, json.dumps(identity, indent=1))


def identity_hash(identity):
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _task_file(folder, rank, suffix):
    return os.path.join(folder, f"{rank:05d}{suffix}")


def _kept_rows(dataset, rows_file, fingerprint):
    """The rows of `dataset` listed in `rows_file`, as a Dataset over the same Arrow table with its indices
    mapping written beside it a chunk at a time and memory-mapped (datasets' select() would hold them all as
    Python ints, ~40 bytes per document)."""
    rows = np.load(rows_file, mmap_mode="r")
    if len(rows) == len(dataset):
        return dataset
    path = rows_file[:-len(".npy")] + ".arrow"
    if not os.path.isfile(path) or MemoryMappedTable.from_file(path).num_rows != len(rows):
        tmp = temporary_name(path)
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_stream(sink, pa.schema([("indices", pa.uint64())])) as out:
            for first in range(0, len(rows), 1 << 20):
                chunk = pa.array(np.asarray(rows[first:first + (1 << 20)], dtype=np.uint64))
                if dataset._indices is not None:  # a selection already (a held-out split): compose
                    chunk = dataset._indices.column(0).take(chunk)
                out.write_table(pa.table({"indices": chunk}))
        publish(tmp, path)
    return Dataset(dataset._data, info=dataset.info, split=dataset.split, fingerprint=fingerprint,
                   indices_table=MemoryMappedTable.from_file(path))


def _concatenate(parts, path):
    """The int64 rows of the .npy files `parts`, end to end, into `path` (on disk, a part at a time); their count."""
    counts = [np.load(part, mmap_mode="r").shape[0] for part in parts]
    if sum(counts) == 0:
        _save_rows(path, np.zeros(0, np.int64))
        return 0
    tmp = temporary_name(path)
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(sum(counts),))
    at = 0
    for part, count in zip(parts, counts):
        out[at:at + count] = np.load(part, mmap_mode="r")
        at += count
    out.flush()
    del out
    publish(tmp, path)
    return at


def _open_files_for(tasks):
    """Merging signatures opens one file per task at once: the soft limit raised to the hard one, or a refusal."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = tasks + 256
    if soft != resource.RLIM_INFINITY and soft < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else min(hard, need), hard))
        except (ValueError, OSError):
            pass
        if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < need:
            raise UserError(f"cleaning in {tasks} tasks opens {tasks} files at once, over this machine's limit of "
                            f"{hard}: raise it (ulimit -n {need}, or the job's limits)")


def _save_rows(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_npy(path, rows)


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, data)
