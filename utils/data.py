"""Data: raw text -> tokenizer -> tokens packed into blocks -> resumable dataloaders.

Tokenization runs once into a token store (utils/store.py: binary shards, memory-mapped), written
by prepare_data.py or, from text, into the cache; packing drops nothing but a split's final
remainder, and a corpus larger than RAM still trains.
"""

import hashlib
import json
import os
import signal
from itertools import chain
from typing import Protocol

import numpy as np
import torch
from accelerate.utils import gather, send_to_device
from datasets import IterableDataset
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader, Dataset, SequentialSampler
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from utils.errors import UserError
from utils.files import CACHE_ROOT, publish, temporary_name, wait_for
from utils.loss import IGNORE_INDEX
from utils.mixture import MixtureSampler, mix_streams
from utils.store import (FORMAT, MANIFEST, TokenView, check_store, clear_mapped_shards, join_tokens, read_manifest,
                         source_content, split_tokens, tokenizer_identity, write_store)

EOS_TOKEN = "<|endoftext|>"
# A tokenizer trained here learns from this many documents (--tokenizer_sample_documents), spread over
# the sources: byte-level BPE training runs at about 8 MB of text per second, so ~3 KB web documents
# cost about 20 s, on each node's main process, whatever the corpus size.
TOKENIZER_SAMPLE_DOCUMENTS = 50_000
TOKENIZER_SAMPLE_CHARS = 8_192  # of each sampled document: 50,000 books stay ~400 MB (~50 s), not 20 GB
# What one evaluation reads per source unless --max_eval_samples says otherwise: a fixed token budget
# (Megatron's eval_iters idea), about 1/3 of a training step's compute at a 1M-token global batch.
DEFAULT_EVAL_TOKENS = 1 << 20


def eval_blocks(max_eval_samples, block_size):
    """Validation blocks evaluated per source: --max_eval_samples, else DEFAULT_EVAL_TOKENS' worth."""
    return max_eval_samples or max(1, DEFAULT_EVAL_TOKENS // block_size)


# --- Tokenizer ------------------------------------------------------------------------------

def load_tokenizer(name, vocab_size, sources, accelerator, sample_documents=TOKENIZER_SAMPLE_DOCUMENTS):
    """The tokenizer `name` (a Hub name or a directory); without one, a byte-level BPE tokenizer of
    `vocab_size` trained on a sample of the training text of `sources` (utils/sources.py load_source):
    `sample_documents` in all, in equal parts per source, spread evenly through each (a stream: its
    first ones), so its cost is bounded whatever the corpus size; cached by the sample's identity."""
    if name:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except Exception as e:
            raise UserError(f"cannot load tokenizer {name!r} ({type(e).__name__}): check the name, or "
                            "download it while online (offline runs need a local directory)") from e
    else:
        keys, texts = [], []
        per_source = max(1, sample_documents // len(sources))  # at least one document of each source
        for source in sources:
            train, column = source["splits"]["train"], source["text_column"]
            if isinstance(train, IterableDataset):  # a stream: learn the vocabulary from its beginning
                keys.append(f"{json.dumps(source['identity'])}-{column}-{per_source}-{TOKENIZER_SAMPLE_CHARS}")
                texts.append(document[column][:TOKENIZER_SAMPLE_CHARS] for document in train.take(per_source))
            else:
                keys.append(f"{train._fingerprint}-{column}-{per_source}-{TOKENIZER_SAMPLE_CHARS}")
                texts.append(_spread_sample(train, column, per_source))
        key = hashlib.sha256(f"{'|'.join(keys)}-{vocab_size}".encode()).hexdigest()[:16]
        path = CACHE_ROOT / "tokenizers" / key
        # the main process of each node first: caches may be node-local (each node trains its own copy)
        # or shared (the first to finish publishes it; the others' copies are dropped)
        with accelerator.local_main_process_first():
            if not path.exists():
                _train_bpe_tokenizer(chain.from_iterable(texts), vocab_size, path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token is None:
        raise UserError(f"tokenizer {name!r} has no EOS token, which packing needs between documents")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _spread_sample(dataset, column, count):
    """The texts of `count` documents spread evenly through `dataset` (all of them if it has fewer),
    read in batches: memory stays bounded by a batch, not the corpus."""
    n = len(dataset)
    chosen = dataset.select([i * n // count for i in range(count)]) if n > count else dataset
    for batch in chosen.select_columns([column]).iter(batch_size=1_000):
        yield from (text[:TOKENIZER_SAMPLE_CHARS] for text in batch[column] if text)


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
    """Consecutive `block_size` windows over one memory-mapped token stream; with `source` (a number),
    each item says which source it is from (validation blocks: evaluation reports each source)."""

    def __init__(self, tokens, block_size, source=None):
        self.tokens, self.block_size, self.source = tokens, block_size, source

    def __len__(self):
        return len(self.tokens) // self.block_size

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        block = torch.from_numpy(self.tokens[i * self.block_size:(i + 1) * self.block_size].astype(np.int64))
        return {"input_ids": block} if self.source is None else {"input_ids": block, "source": self.source}


def document_encoder(tokenizer):
    """texts -> token ids of each non-empty text followed by EOS, in one batched tokenizer call.

    A document's text is encoded as text: a literal "<|endoftext|>" in it (web and code corpora hold
    that string) is not the EOS token, so only the EOS appended here ends a document."""
    eos = tokenizer.eos_token_id
    backend = getattr(tokenizer, "backend_tokenizer", None)  # Rust: no offsets, no Python-side wrapping
    if backend is not None:
        backend = Tokenizer.from_str(backend.to_str())  # a copy: the tokenizer itself keeps its special tokens
        backend.encode_special_tokens = True  # matched as plain text, not as added tokens

    def encode(texts):
        texts = [t for t in texts if t]
        if backend is not None:
            ids = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        else:
            ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False,
                            verbose=False)["input_ids"]
        for x in ids:
            x.append(eos)  # in place: no second copy of every token list
        return ids
    return encode


def tokenize_and_pack(sources, tokenizer, block_size, accelerator, max_eval_samples=None, workers=None):
    """Tokenize every split of `sources` (utils/sources.py load_source) once into a token store in the
    cache (utils/store.py), then cut it into blocks: open_blocks' list, one entry per source.

    The store is keyed by the data's fingerprints, the text columns and the tokenizer, so a second run
    memory-maps it at once. The processes of each node write it together, each every n-th shard (node-local
    caches: each node writes its own; shared ones: the nodes write the same files, the last copy stays), and
    wait for the rest on the filesystem: no process-group timeout bounds how large a corpus may be."""
    key = hashlib.sha256(json.dumps([FORMAT, tokenizer_identity(tokenizer), *[
        [s["text_column"], s.get("held_out"), {split: d._fingerprint for split, d in s["splits"].items()}]
        for s in sources]]).encode()).hexdigest()[:16]
    path = CACHE_ROOT / "stores" / key
    part = node_part(accelerator)
    if not (path / MANIFEST).is_file():  # each process of a node tokenizes its part; none waits in a collective
        if part[0] == 0:
            documents = sum(len(d) for s in sources for d in s["splits"].values())
            accelerator.print(f"tokenizing {documents:,} documents into {path} ({part[1]} process(es) on each node; "
                              "prepare_data.py does it once, before the job, for any number of runs)")
        write_token_store(path, sources, tokenizer, workers and max(1, workers // part[1]), part=part)
        wait_for([path / MANIFEST], "token store manifests (written once every shard is)")
    return open_blocks(path, block_size, max_eval_samples, [s["weight"] for s in sources],
                       check=accelerator.is_main_process)


def node_part(accelerator):
    """(this process's index on its node, the node's processes): who tokenizes which shards. A node is the
    processes whose ranks run from (rank - local rank) on, as torchrun and SLURM's block layout number them."""
    node = accelerator.process_index - accelerator.local_process_index  # the rank of this node's first process
    everyone = gather(torch.tensor([[node, accelerator.local_process_index]], device=accelerator.device)).cpu()
    local = sorted(everyone[everyone[:, 0] == node][:, 1].tolist())  # accelerate's gather: Accelerator or PartialState
    if local != list(range(len(local))):
        raise UserError("the processes of a node do not have consecutive ranks (local ranks "
                        f"{local} from rank {node}), so they cannot share tokenizing: tokenize with prepare_data.py "
                        "and train with --data_dir")
    return accelerator.local_process_index, len(local)


def write_token_store(path, sources, tokenizer, workers=None, **options):
    """Tokenize `sources` (utils/sources.py load_source) into a token store at `path`: what
    prepare_data.py and the cache write. Returns the manifest."""
    return write_store(path, sources, tokenizer, document_encoder(tokenizer), workers, **options)


def open_blocks(path, block_size, max_eval_samples=None, weights=None, check=True):
    """A token store's sources as blocks of `block_size` tokens over its memory-mapped shards:
    [{'label', 'identity', 'weight', 'train': PackedBlocks, 'validation': PackedBlocks, 'eval_tokens',
    'held_out_tokens'}] in store order. weights: one per source, or None. check: stat every shard now
    (one process is enough: every process checks a shard's size again when it maps it).

    Evaluation takes the first eval_blocks(max_eval_samples) blocks of each validation split. A split
    held out of train gives what evaluation does not use back to training, from the first document
    boundary after the evaluated tokens on (as --streaming does): nothing is both trained on and
    evaluated, and only the rest of the one document that evaluation cuts is neither."""
    manifest = read_manifest(path)
    if check:  # a shard cut short (an interrupted copy) would train on less, silently
        check_store(path, manifest)
    clear_mapped_shards()  # a store written again at the same path in this process: no stale mappings
    sources = manifest["sources"]
    if weights is not None and len(weights) != len(sources):
        raise UserError(f"--train_weights has {len(weights)} values for the {len(sources)} sources of token store "
                        f"{path} ({', '.join(s['label'] for s in sources)}): give one weight per source")
    wanted = eval_blocks(max_eval_samples, block_size) * block_size
    blocks = []
    for number, source in enumerate(sources):
        validation, train = (split_tokens(path, manifest, number, split) for split in ("validation", "train"))
        held_out = 0
        if source["validation"] == "held_out":
            held_out = validation.document_boundary(wanted)
            train = join_tokens([TokenView(validation, held_out, len(validation)), train])  # what evaluation leaves
        opened = {"label": source["label"], "identity": source["identity"],
                  "content": source_content(path, manifest, number), "weight": weights[number] if weights else None,
                  "held_out_tokens": held_out, "cleaning": source.get("cleaning"),  # prepare_data.py --clean's
                  "train": PackedBlocks(join_tokens([train]), block_size),
                  "validation": PackedBlocks(join_tokens([TokenView(validation, 0, min(wanted, len(validation)))]),
                                             block_size, source=number)}
        opened["eval_tokens"] = len(opened["validation"]) * block_size
        for split in ("train", "validation"):
            if len(opened[split]) == 0 and (split == "validation" or len(sources) == 1):
                raise UserError(f"the {split} split of {source['label']} has {len(opened[split].tokens)} tokens, fewer "
                                f"than one block of {block_size}: give more data or a smaller --block_size")
        blocks.append(opened)
    return blocks


def data_signature(blocks, tokenizer):
    """What the run trains on, per source, for a checkpoint to compare on resume: label, share of the
    weights, content (a store's shard digests; a stream's files or Hub dataset, not their mtimes, which a
    copy to node-local disk changes), tokens held out of training (--max_eval_samples and
    --validation_split_percentage move them) and training blocks."""
    weights = [b["weight"] for b in blocks]
    total = sum(weights) if None not in weights else None
    return {"tokenizer": tokenizer_identity(tokenizer), "sources": [
        {"label": b["label"], "weight": None if total is None else round(b["weight"] / total, 12),
         "content": b.get("content") or _without_mtimes(b["identity"]), "held_out": b["held_out_tokens"],
         "train_blocks": None if isinstance(b["train"], list) else len(b["train"])}  # a list: a stream's parts
        for b in blocks]}


def _without_mtimes(identity):
    return json.loads(json.dumps(identity), object_hook=lambda d: {k: v for k, v in d.items() if k != "mtime_ns"})


# --- Loaders --------------------------------------------------------------------------------

class TrainOrder(Protocol):
    """What the training loop and a checkpoint ask of the order of training blocks, whether it comes
    from the sources on disk (utils/mixture.py MixtureSampler) or from streams (utils/stream.py
    StreamedBlocks, utils/mixture.py MixedStreams). A position is global (counted for all processes),
    so it survives a change of process count."""

    steps_per_epoch: int | None  # None: a stream's length is unknown until it has been read
    # True: each process reads its own parts of the streams, and its position() holds only theirs
    # (utils/checkpoint.py merges every process's); False: one order for the job, read on the main process
    each_process_reads: bool

    def set_epoch(self, epoch): ...

    def position(self, samples_into_epoch) -> dict: ...  # what a checkpoint stores

    def start_at(self, position): ...  # continue exactly there, reading nothing before it again


class Collate:
    """Stacks blocks into the model's inputs: input_ids and labels (the model shifts them). With
    `document_masking_eos` (documents are joined by that EOS id), tokens attend only within their own
    document: position ids restart after each EOS, so transformers builds a block-diagonal causal mask
    for packed sequences (sdpa, eager and flex attention; the model class is untouched), and a
    document's first token is not predicted from the document before it (its label is ignored).
    Flash attention reads packed position ids only at batch size 1: utils/model.py build_model hands
    it the documents' bounds for any batch size."""

    def __init__(self, document_masking_eos=None):
        self.eos = document_masking_eos

    def __call__(self, items):
        input_ids = torch.stack([item["input_ids"] for item in items])
        batch = {"input_ids": input_ids, "labels": input_ids}
        for key in ("source", "block"):  # validation blocks: which source each is from, their number (evaluation pops them)
            if key in items[0]:
                batch[key] = torch.tensor([item[key] for item in items])
        if self.eos is None:
            return batch
        starts = torch.zeros_like(input_ids, dtype=torch.bool)
        starts[:, 1:] = input_ids[:, :-1] == self.eos  # the token after an EOS starts a document
        index = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        position_ids = index - torch.where(starts, index, 0).cummax(dim=1).values
        return {**batch, "labels": input_ids.masked_fill(starts, IGNORE_INDEX), "position_ids": position_ids}


class Numbered(Dataset):
    """Validation blocks with their number: evaluation counts each block once, however many processes
    computed it (the loader's padding to even batches, tensor- and context-parallel copies)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {**self.dataset[i], "block": i}


def _ignore_sigterm(worker_id):
    """SLURM signals every process of a job step, loader workers included, and a worker that dies
    makes the trainer raise before it can save: the trainer handles SIGTERM, its workers ignore it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class LocalBatches:
    """The training batches of a process that reads its own parts of the streams: no DataLoader, so
    accelerate's prepare leaves it as it is (it would split or dispatch the batches); it only moves
    each batch to the device."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def set_epoch(self, epoch):
        self.loader.dataset.set_epoch(epoch)

    def __iter__(self):
        for batch in self.loader:
            yield send_to_device(batch, self.device, non_blocking=self.loader.pin_memory)


def build_dataloaders(blocks, samples_per_step, train_batch_size, eval_batch_size, seed, num_workers=0,
                      document_masking_eos=None, stream_reads=None, device=None):
    """(train loader, validation loader, the TrainOrder: where the data stands, for the loop and checkpoints).

    blocks: open_blocks' list (or utils/stream.py stream_blocks', whose 'train' is a source's parts,
    of which this process reads `stream_reads`, all by default). The validation loader covers every
    source's validation blocks, each item tagged with its source's number."""
    common = {"num_workers": num_workers, "pin_memory": torch.cuda.is_available(),
              "worker_init_fn": _ignore_sigterm if num_workers else None,
              "collate_fn": Collate(document_masking_eos)}
    validation = Numbered(ConcatDataset([b["validation"] for b in blocks]))
    evaluation = DataLoader(validation, sampler=SequentialSampler(validation), batch_size=eval_batch_size, **common)
    train_sets = [b["train"] for b in blocks]
    if isinstance(train_sets[0], list):  # streams, in parts: they order their own blocks
        train_order = mix_streams(train_sets, [b["weight"] for b in blocks], stream_reads).cut_to_steps(samples_per_step)
        train = DataLoader(train_order, batch_size=train_batch_size, pin_memory=common["pin_memory"],
                           collate_fn=common["collate_fn"])
        if train_order.each_process_reads:
            train = LocalBatches(train, device)
        return train, evaluation, train_order
    train_order = MixtureSampler([len(t) for t in train_sets], [b["weight"] for b in blocks], samples_per_step, seed)
    if train_order.usable == 0:
        raise UserError(f"the training data has {sum(map(len, train_sets))} blocks, fewer than one optimizer step "
                        f"({samples_per_step} sequences): give more data or a smaller batch / --block_size")
    train = DataLoader(ConcatDataset(train_sets), batch_sampler=BatchSampler(train_order, train_batch_size,
                                                                             drop_last=False), **common)
    return train, evaluation, train_order
