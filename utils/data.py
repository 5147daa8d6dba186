"""Data: raw text -> tokenizer -> tokens packed into blocks -> resumable dataloaders.

Tokenization runs once into a token store (utils/store.py: binary shards, memory-mapped), written
by prepare_data.py or, from text, into the cache; packing drops nothing but a split's final
remainder, and a corpus larger than RAM still trains.
"""

import ast
import functools
import hashlib
import json
import os
import random
import signal
import sysconfig
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from datasets import DatasetDict, Features, IterableDataset, IterableDatasetDict, Value, load_dataset
from huggingface_hub.constants import HF_HOME
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from utils.config import local_data_builder
from utils.errors import UserError, first_line
from utils.files import publish, temporary_name, write_atomic
from utils.store import MANIFEST, read_manifest, split_tokens, tokenizer_identity, write_store

CACHE_ROOT = Path(HF_HOME) / "clm-train"
EOS_TOKEN = "<|endoftext|>"
TOKENIZER_STREAM_DOCUMENTS = 10_000  # a tokenizer trained for --streaming learns from the first documents
IGNORE_INDEX = -100  # a label the loss leaves out (transformers' and torch's convention)


# --- The embedded default corpus: English text that ships with every Python install ---------

@functools.cache  # parsing the standard library takes seconds; the result depends only on this Python
def embedded_corpus_file():
    """Write Python's own help topics and standard-library docstrings as JSON lines, once."""
    import pydoc_data.topics

    documents = list(pydoc_data.topics.topics.values())
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)))
        docstrings = [d for d in map(ast.get_docstring, nodes) if d and len(d) >= 80]
        if docstrings:
            documents.append("\n\n".join(docstrings))
    random.Random(0).shuffle(documents)  # the validation slice is the first few percent
    lines = "".join(json.dumps({"text": d}) + "\n" for d in documents)
    path = CACHE_ROOT / "corpus" / f"python-docs-{hashlib.sha256(lines.encode()).hexdigest()[:16]}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lines)
    return str(path)


# --- Raw text -------------------------------------------------------------------------------

def load_raw_datasets(args):
    """A DatasetDict with 'train' and 'validation', from the Hub, local files or the embedded corpus.

    Without a validation split, the first --validation_split_percentage of train is held out.
    With --streaming: IterableDatasets, and the validation split is held out by utils/stream.py."""
    streaming = getattr(args, "streaming", False)
    if args.dataset_name:
        try:
            raw = load_dataset(args.dataset_name, args.dataset_config_name, streaming=streaming)
        except Exception as e:  # datasets raises many types for "not found / offline"
            raise UserError(f"cannot load dataset {args.dataset_name!r} ({type(e).__name__}): check the name, "
                            "or pass local files with --train_file when offline") from e
    else:
        train_file = args.train_file or embedded_corpus_file()
        files = {"train": train_file, **({"validation": args.validation_file} if args.validation_file else {})}
        raw = {split: _load_local(path, streaming) for split, path in files.items()}
        raw = IterableDatasetDict(raw) if streaming else DatasetDict(raw)
    if "train" not in raw:
        raise UserError(f"dataset {args.dataset_name!r} has no 'train' split (splits: {sorted(raw)})")
    if streaming:
        if next(iter(raw["train"]), None) is None:
            raise UserError("the train data is empty: check the file or dataset")
        return raw
    if "validation" not in raw:
        train = raw["train"]
        held_out = max(1, round(len(train) * args.validation_split_percentage / 100))  # at least one document
        if len(train) and held_out >= len(train):
            raise UserError(f"{args.validation_split_percentage}% of {len(train)} documents leaves an empty split: "
                            "give a --validation_file or change --validation_split_percentage")
        raw = DatasetDict(validation=train.select(range(held_out)), train=train.select(range(held_out, len(train))))
    for split in ("train", "validation"):
        if len(raw[split]) == 0:
            raise UserError(f"the {split} data is empty: check the file or dataset")
    return raw


def _load_local(path, streaming=False):
    if os.path.getsize(path) == 0:
        raise UserError(f"{path} is empty: give a file with text in it")
    builder = local_data_builder(path)
    kwargs = {"sample_by": "paragraph", "keep_linebreaks": True} if builder == "text" else {}
    try:
        return load_dataset(builder, data_files=path, split="train", streaming=streaming, **kwargs)
    except Exception as e:  # pyarrow / datasets raise many types for unreadable files
        problem = _bad_json_line(path) if builder == "json" else None
        raise UserError(f"cannot read {path}: {problem or first_line(e)}") from e


def _bad_json_line(path):
    """'line N is not valid JSON (...)' for the first malformed line of a JSON-lines file, else None."""
    with open(path, encoding="utf-8", errors="replace") as f:
        if f.read(1) != "{":  # a single JSON document, not JSON lines: line numbers would mislead
            return None
        f.seek(0)
        for number, line in enumerate(f, 1):
            try:
                line.strip() and json.loads(line)
            except ValueError as e:
                return f"line {number} is not valid JSON ({e}): fix or remove that line"
    return None


def resolve_text_column(dataset, requested):
    features = dataset.features
    if features is None:  # a stream whose builder infers the columns while reading
        features = Features({name: Value("string") if isinstance(value, str) else Value("null")
                             for name, value in next(iter(dataset)).items()})
    if requested in features:
        return requested
    string_columns = [n for n, f in features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if len(string_columns) == 1:
        return string_columns[0]
    raise UserError(f"no text column {requested!r} in the data (columns: {list(features)}): "
                    "pass --text_column NAME")


# --- Tokenizer ------------------------------------------------------------------------------

def load_tokenizer(args, raw_train, text_column, accelerator):
    name = args.tokenizer_name or args.model_name_or_path
    if name:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except Exception as e:
            raise UserError(f"cannot load tokenizer {name!r} ({type(e).__name__}): check the name, or "
                            "download it while online (offline runs need a local directory)") from e
    else:
        if isinstance(raw_train, IterableDataset):  # a stream: learn the vocabulary from its beginning
            source = json.dumps(source_identity(args))
            texts = (document[text_column] for document in raw_train.take(TOKENIZER_STREAM_DOCUMENTS))
        else:
            source, texts = raw_train._fingerprint, raw_train[text_column]
        key = hashlib.sha256(f"{source}-{text_column}-{args.vocab_size}".encode()).hexdigest()[:16]
        path = CACHE_ROOT / "tokenizers" / key
        # the main process of each node first: caches may be node-local (each node trains its own copy)
        # or shared (the first to finish publishes it; the others' copies are dropped)
        with accelerator.local_main_process_first():
            if not path.exists():
                _train_bpe_tokenizer(texts, args.vocab_size, path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token is None:
        raise UserError(f"tokenizer {name!r} has no EOS token, which packing needs between documents")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def source_identity(args):
    """What the data is, for caches and results.json: a Hub dataset's name, config and revision, or a
    local file's path, size and modification time."""
    if args.dataset_name:
        return {"name": args.dataset_name, "config": args.dataset_config_name}
    path = args.train_file or embedded_corpus_file()
    return {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "mtime_ns": os.stat(path).st_mtime_ns}


def store_tokenizer(path, expected=None):
    """The tokenizer saved in token store `path`; `expected` (a tokenizer name) must be the same one."""
    manifest = read_manifest(path)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    if expected:
        wanted = AutoTokenizer.from_pretrained(expected)
        if tokenizer_identity(wanted) != manifest["tokenizer"]:
            raise UserError(f"token store {path} was tokenized with another tokenizer than {expected!r}: prepare it "
                            f"with prepare_data.py --tokenizer_name {expected} (or the model's name)")
    return tokenizer


def _train_bpe_tokenizer(texts, vocab_size, path):
    """A byte-level BPE tokenizer (GPT-2 style) trained on the training text, saved to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator((t for t in texts if t), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                        pad_token=EOS_TOKEN, model_max_length=1 << 30)
    tmp = temporary_name(path)
    tokenizer.save_pretrained(tmp)
    publish(tmp, path, keep_existing=True)


# --- Tokenize and pack ----------------------------------------------------------------------

class PackedBlocks(Dataset):
    """Consecutive `block_size` windows over one memory-mapped token stream."""

    def __init__(self, tokens, block_size):
        self.tokens, self.block_size = tokens, block_size

    def __len__(self):
        return len(self.tokens) // self.block_size

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        block = self.tokens[i * self.block_size:(i + 1) * self.block_size]
        return {"input_ids": torch.from_numpy(block.astype(np.int64))}


def document_encoder(tokenizer):
    """texts -> token ids of each non-empty text followed by EOS, in one batched tokenizer call."""
    eos = tokenizer.eos_token_id
    backend = getattr(tokenizer, "backend_tokenizer", None)  # Rust: no offsets, no Python-side wrapping

    def encode(texts):
        texts = [t for t in texts if t]
        if backend is not None:
            ids = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        else:
            ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        for x in ids:
            x.append(eos)  # in place: no second copy of every token list
        return ids
    return encode


def tokenize_and_pack(raw, text_column, tokenizer, args, accelerator, identity=None):
    """Tokenize every split once into a token store in the cache (utils/store.py), then cut it into blocks.

    The store is keyed by the data's fingerprints, the text column and the tokenizer, so a second run
    memory-maps it at once; the main process of each node writes it (node-local or shared caches)."""
    key = hashlib.sha256(json.dumps([tokenizer_identity(tokenizer), text_column,
                                     {split: d._fingerprint for split, d in raw.items()}]).encode()).hexdigest()[:16]
    path = CACHE_ROOT / "stores" / key
    with accelerator.local_main_process_first():
        if not (path / MANIFEST).is_file():
            write_token_store(path, raw, text_column, tokenizer, identity, args.preprocessing_num_workers)
    return open_blocks(path, args.block_size, getattr(args, "max_eval_samples", None))


def write_token_store(path, raw, text_column, tokenizer, identity=None, workers=None, **options):
    """Tokenize the splits of `raw` into a token store at `path` (what prepare_data.py and the cache write)."""
    source = {"label": source_label(identity), "identity": identity or {"fingerprint": raw["train"]._fingerprint},
              "text_column": text_column, "splits": dict(raw)}
    return write_store(path, [source], tokenizer, document_encoder(tokenizer), workers, **options)


def open_blocks(path, block_size, max_eval_samples=None):
    """{split: blocks of `block_size` tokens} over a token store's memory-mapped shards."""
    manifest = read_manifest(path)
    blocks = {}
    for split in manifest["sources"][0]["splits"]:
        tokens = split_tokens(path, manifest, 0, split)
        if split == "validation" and max_eval_samples:
            tokens = tokens[:max_eval_samples * block_size]
        blocks[split] = PackedBlocks(tokens, block_size)
        if len(blocks[split]) == 0:
            raise UserError(f"the {split} split has {len(tokens)} tokens, fewer than one block of "
                            f"{block_size}: give more data or a smaller --block_size")
    return blocks


def source_label(identity):
    """A short name for a source in logs and metrics: a file's name or a Hub dataset's."""
    if not identity:
        return "data"
    name = identity.get("name") or os.path.basename(str(identity.get("path", "data")))
    return name.rsplit(".", 1)[0] if "path" in identity else name


# --- Loaders --------------------------------------------------------------------------------

class TrainOrder(Protocol):
    """What the training loop and a checkpoint ask of the order of training blocks, whether it comes
    from the on-disk sampler (ResumableSampler) or from a stream (utils/stream.py StreamedBlocks).
    A position is global (counted for all processes), so it survives a change of process count."""

    steps_per_epoch: int | None  # None: a stream's length is unknown until it has been read

    def set_epoch(self, epoch): ...

    def position(self, samples_into_epoch) -> dict: ...  # what a checkpoint stores

    def start_at(self, position): ...  # continue exactly there, reading nothing before it again


class ResumableSampler(Sampler):
    """A shuffle fixed by (seed, epoch), cut to whole optimizer steps, that can start mid-epoch.

    It orders samples for all processes at once (accelerate deals its batches out round-robin),
    so a position is counted in global samples and survives a change of process count.
    """

    def __init__(self, num_samples, samples_per_step, seed):
        self.num_samples, self.seed, self.epoch, self.skip = num_samples, seed, 0, 0
        self.usable = num_samples // samples_per_step * samples_per_step
        self.steps_per_epoch = self.usable // samples_per_step

    def set_epoch(self, epoch):
        self.epoch = epoch

    def position(self, samples_into_epoch):
        return {"samples_into_epoch": samples_into_epoch, "epoch_complete": samples_into_epoch == self.usable}

    def start_at(self, position):
        """Skip the samples before `position` in the next epoch iterated (exact resume, no data read)."""
        self.skip = position["samples_into_epoch"]

    def __iter__(self):
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        skip, self.skip = self.skip, 0
        return iter(order[skip:self.usable].tolist())

    def __len__(self):
        return self.usable - self.skip


class Collate:
    """Stacks blocks into the model's inputs: input_ids and labels (the model shifts them). With
    `document_masking_eos` (documents are joined by that EOS id), tokens attend only within their own
    document: position ids restart after each EOS, so transformers builds a block-diagonal causal mask
    for packed sequences (sdpa, flash and flex attention alike; the model class is untouched), and a
    document's first token is not predicted from the document before it (its label is ignored)."""

    def __init__(self, document_masking_eos=None):
        self.eos = document_masking_eos

    def __call__(self, items):
        input_ids = torch.stack([item["input_ids"] for item in items])
        if self.eos is None:
            return {"input_ids": input_ids, "labels": input_ids}
        starts = torch.zeros_like(input_ids, dtype=torch.bool)
        starts[:, 1:] = input_ids[:, :-1] == self.eos  # the token after an EOS starts a document
        index = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        position_ids = index - torch.where(starts, index, 0).cummax(dim=1).values
        return {"input_ids": input_ids, "labels": input_ids.masked_fill(starts, IGNORE_INDEX),
                "position_ids": position_ids}


def _ignore_sigterm(worker_id):
    """SLURM signals every process of a job step, loader workers included, and a worker that dies
    makes the trainer raise before it can save: the trainer handles SIGTERM, its workers ignore it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_dataloaders(blocks, args, samples_per_step, document_masking_eos=None):
    """(train loader, validation loader, the TrainOrder: where the data stands, for the loop and checkpoints)."""
    common = {"num_workers": args.dataloader_num_workers, "pin_memory": torch.cuda.is_available(),
              "worker_init_fn": _ignore_sigterm if args.dataloader_num_workers else None,
              "collate_fn": Collate(document_masking_eos)}
    evaluation = DataLoader(blocks["validation"], sampler=SequentialSampler(blocks["validation"]),
                            batch_size=args.per_device_eval_batch_size, **common)
    if isinstance(blocks["train"], torch.utils.data.IterableDataset):  # a stream orders its own blocks
        train_order = blocks["train"].cut_to_steps(samples_per_step)
        train = DataLoader(train_order, batch_size=args.per_device_train_batch_size, pin_memory=common["pin_memory"],
                           collate_fn=common["collate_fn"])
        return train, evaluation, train_order
    train_order = ResumableSampler(len(blocks["train"]), samples_per_step, args.seed)
    if train_order.usable == 0:
        raise UserError(f"the train split has {len(blocks['train'])} blocks, fewer than one optimizer step "
                        f"({samples_per_step} sequences): give more data or a smaller batch / --block_size")
    train = DataLoader(blocks["train"], batch_sampler=BatchSampler(train_order, args.per_device_train_batch_size,
                                                                   drop_last=False), **common)
    return train, evaluation, train_order
