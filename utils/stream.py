"""--streaming: read, tokenize and pack a corpus on the fly, for data too large to tokenize up front.

Each source's training stream is cut into --stream_readers parts (`datasets`' split_dataset_by_node:
whole shards where they divide evenly, else every L-th document), fixed for the run. When the
process count divides the parts, each process reads and tokenizes its own (as torchtitan does);
otherwise the main process reads them all and accelerate dispatches each batch. Blocks are
shuffled within windows (and `datasets` reshuffles the shard order every pass). A checkpoint
stores where each part's current window starts in its stream (the stream's own `state_dict` plus
a token offset), so a resume re-reads one window per part, not the epoch so far.
"""

import logging
import math
import queue
import threading
from itertools import chain, islice

import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import IterableDataset

from utils.errors import UserError
from utils.data import PackedBlocks, document_encoder, eval_blocks
from utils.sources import held_out_documents

DOCUMENTS_PER_BATCH = 256  # one call of the Rust tokenizer, which spreads a batch over its threads
_KEPT_ANCHORS = 8  # windows a checkpoint may lag behind the reader (prefetching)

# A shuffle buffer of one example holds nothing to lose on resume; say so once, not on every resume.
logging.getLogger("datasets.iterable_dataset").addFilter(lambda record: "shuffle buffer" not in record.getMessage())


def stream_blocks(sources, tokenizer, block_size, window_blocks, seed, max_eval_samples=None,
                  validation_split_percentage=5, readers=1):
    """Per source (utils/sources.py load_source), as utils/data.py open_blocks gives them: {'label',
    'identity', 'weight', 'train': its `readers` parts (StreamedBlocks), 'validation': PackedBlocks,
    'eval_tokens', 'held_out_tokens'}; only the validation blocks are made up front."""
    encode = document_encoder(tokenizer)
    blocks = []
    for number, source in enumerate(sources):
        validation, held_documents, held_out = hold_out_validation(
            source["splits"], source["text_column"], encode, block_size, max_eval_samples,
            validation_split_percentage, number, source["label"])
        parts, shuffle_shards = split_stream(source["splits"]["train"], readers, held_documents)
        blocks.append({"label": source["label"], "identity": source["identity"], "weight": source["weight"],
                       "train": [StreamedBlocks(part, source["text_column"], encode, block_size, window_blocks, seed,
                                                (l, readers), shuffle_shards) for l, part in enumerate(parts)],
                       "validation": validation, "eval_tokens": len(validation) * block_size,
                       "held_out_tokens": held_out})
    return blocks


def stream_readers(requested, saved_position, num_processes, process_index, samples_per_step, can_dispatch=True):
    """(L, the parts this process reads): L = --stream_readers, or the resumed checkpoint's, or the
    (data-parallel) process count. Each of P processes reads L / P parts when P divides L; else every part
    is read on the main process (the others hold the order but never read it: accelerate dispatches the
    batches), which accelerate cannot do under tensor / context parallelism (`can_dispatch` False)."""
    streamed = saved_position and ("stream_state" in saved_position or "drawn" in saved_position)  # a stream's
    saved = saved_position.get("readers", 1) if streamed else None
    if requested and saved and requested != saved:
        raise UserError(f"--stream_readers {requested}, but the checkpoint's streams were read in {saved} parts (the "
                        f"data order depends on it): drop --stream_readers to resume with {saved}")
    readers = requested or saved or num_processes
    if samples_per_step % readers:
        raise UserError(f"the global batch of {samples_per_step} sequences is not a multiple of the {readers} stream "
                        f"readers (--stream_readers, by default the process count): each step takes the same share "
                        f"of every part; give --stream_readers a divisor of {samples_per_step}")
    if readers % num_processes and not can_dispatch:  # under tensor / context parallelism every rank reads its own
        fix = (f"resume on a mesh whose data-parallel ranks divide {readers}" if saved else
               f"give --stream_readers a multiple of {num_processes}")
        raise UserError(f"the streams are read in {readers} parts, not a multiple of the {num_processes} data-parallel "
                        f"ranks, and under tensor / context parallelism each rank must read its own parts: {fix}")
    if readers % num_processes:
        return readers, range(readers)
    share = readers // num_processes
    return readers, range(process_index * share, (process_index + 1) * share)


def split_stream(train, readers, held_documents=0):
    """(`train` in `readers` parts (one: itself), whether a part may reshuffle its shard order per pass),
    each part without the documents held out for validation (the stream's first `held_documents`, in
    file order). When `readers` divides the shard count, part l holds shards l, l+L, ... (fixed: a pass
    reshuffles only its own) and skips the held-out documents among them, its first ones; else each
    part keeps every L-th document after the held-out ones, in the shards' fixed order (a reshuffle
    would hand other documents to each part on each pass)."""
    if readers == 1:
        return [train.skip(held_documents) if held_documents else train], True
    if train.num_shards % readers == 0:
        skips, whole = _held_out_per_part(train, readers, held_documents)
        if not any(all(whole[l::readers]) for l in range(readers)):  # else a part would hold nothing to train on
            parts = [train.shard(readers, l, contiguous=False) for l in range(readers)]
            return [part.skip(skip) if skip else part for part, skip in zip(parts, skips)], True
    rest = train.skip(held_documents) if held_documents else train  # skip, then every L-th: nothing held out
    return [split_dataset_by_node(rest, l, readers, strategy="examples") for l in range(readers)], False


def _held_out_per_part(train, readers, held_documents):
    """(how many of its first documents each part holds out, whether each shard is held out whole),
    when part l holds shards l, l+L, ...: the held-out documents are the stream's first ones, so shard
    j's count is counted by reading shard j's beginning (the held-out documents again, no more)."""
    skips, whole, left = [0] * readers, [False] * train.num_shards, held_documents
    for j in range(train.num_shards):
        if left == 0:
            break
        batches = iter(train.shard(train.num_shards, j, contiguous=True).iter(batch_size=DOCUMENTS_PER_BATCH))
        for batch in batches:
            documents = len(next(iter(batch.values())))
            taken = min(left, documents)
            skips[j % readers], left = skips[j % readers] + taken, left - taken
            if left == 0:  # the held-out documents end in this shard: at its very end?
                whole[j] = taken == documents and next(batches, None) is None
                break
        else:
            whole[j] = True
    return skips, whole


def hold_out_validation(raw, text_column, encode, block_size, max_eval_samples=None, validation_split_percentage=5,
                        source=None, label="data"):
    """(validation blocks in memory, documents held out of training, their tokens), as on disk
    (utils/data.py open_blocks): the validation split's first eval_blocks(max_eval_samples) blocks;
    without one, the first training documents that fill them are held out and training starts at the
    next document (split_stream skips them, which keeps the stream's shard order fixed: `datasets`
    cannot skip within reshuffled shards). A stream that ends before filling them was read whole: like a corpus on disk, its first
    validation_split_percentage of documents are held out and evaluated, the rest trains."""
    wanted = eval_blocks(max_eval_samples, block_size) * block_size
    stream = raw["validation"] if "validation" in raw else raw["train"]
    pieces, have = [], 0  # one entry per document (empty ones too: they count as documents on disk)
    for batch in stream.iter(batch_size=DOCUMENTS_PER_BATCH):
        texts = batch[text_column]
        encoded = iter(encode(texts))  # empty texts have no entry
        for text in texts:
            pieces.append(next(encoded) if text else [])
            have += len(pieces[-1])
            if have >= wanted:
                break
        if have >= wanted:
            break
    if "validation" not in raw and have < wanted:  # read whole
        pieces = pieces[:held_out_documents(len(pieces), validation_split_percentage, label)]
    held_out = sum(map(len, pieces))
    tokens = np.fromiter(chain.from_iterable(pieces), dtype=np.int32, count=held_out)[:wanted]
    if len(tokens) < block_size:
        raise UserError(f"the validation split of {label} has {len(tokens)} tokens, fewer than one block of "
                        f"{block_size}: give more data or a smaller --block_size")
    if "validation" in raw:
        return PackedBlocks(tokens, block_size, source=source), 0, 0
    return PackedBlocks(tokens, block_size, source=source), len(pieces), held_out


class StreamedBlocks(IterableDataset):
    """Blocks of `block_size` tokens packed on the fly from a `datasets` IterableDataset.

    Documents are joined with EOS as in the on-disk pipeline; the stream is cut into windows of
    whole optimizer steps and each window is shuffled by (seed, epoch, window) (and the part's
    number, past the first part). An epoch ends at the last whole optimizer step of the stream.
    part: (l, L), this stream is part l of a source's L (utils/stream.py split_stream).
    """

    each_process_reads = False  # utils/data.py TrainOrder: one part, read on the main process

    def __init__(self, source, text_column, encode, block_size, window_blocks, seed, part=(0, 1), shuffle_shards=True):
        self.source, self.text_column, self.encode = source, text_column, encode
        self.block_size, self.window_blocks, self.seed = block_size, window_blocks, seed
        (self.part, self.parts), self.shuffle_shards = part, shuffle_shards
        self.epoch, self.start, self.anchors, self.epoch_length = 0, None, {}, None
        self.cut_to_steps(1)

    def cut_to_steps(self, samples_per_step):
        """Make windows and epochs whole optimizer steps of `samples_per_step` blocks."""
        self.samples_per_step = samples_per_step
        self.window = math.ceil(max(self.window_blocks, 1) / samples_per_step) * samples_per_step
        self.steps_per_epoch = None  # unknown until the stream has been read (utils/data.py TrainOrder)
        return self

    def set_epoch(self, epoch):
        self.epoch = epoch

    def position(self, samples_into_epoch):
        """Where the block after `samples_into_epoch` consumed blocks lies in the stream (JSON-able)."""
        window = samples_into_epoch // self.window
        if window not in self.anchors:
            raise RuntimeError(f"stream position of window {window} is not known (have {sorted(self.anchors)})")
        state, offset = self.anchors[window]
        return {"samples_into_epoch": samples_into_epoch, "epoch_complete": samples_into_epoch == self.epoch_length,
                "stream_state": state, "token_offset": offset}

    def start_at(self, position):
        """Begin the next epoch iterated at `position` (from `position()`), reading one window at most."""
        self.start = position

    def __iter__(self):
        start, self.start = self.start, None
        window, skip = divmod(start["samples_into_epoch"], self.window) if start else (0, 0)
        self.anchors = {window: (start["stream_state"], start["token_offset"]) if start else (None, 0)}
        self.epoch_length = None  # known once the stream is exhausted (accelerate reads one batch ahead)
        end = window * self.window
        for window, (blocks, next_anchor) in enumerate(_read_ahead(self._windows(self.anchors[window])), window):
            self.anchors[window + 1] = next_anchor
            self.anchors.pop(window - _KEPT_ANCHORS, None)
            whole_steps = len(blocks) // self.samples_per_step * self.samples_per_step  # only the last window has less
            key = [self.seed, self.epoch, window] + ([self.part] if self.part else [])  # part 0: one reader's order
            order = np.random.default_rng(key).permutation(len(blocks))[:whole_steps]
            end = window * self.window + whole_steps
            for i in order[skip:]:
                yield {"input_ids": torch.from_numpy(blocks[i].astype(np.int64))}
            skip = 0
        self.epoch_length = end
        if start is None and end == 0 and self.parts > 1:
            raise UserError(f"part {self.part + 1} of the training stream's {self.parts} (--stream_readers, by default "
                            f"the process count) holds no block of {self.block_size} tokens: give fewer "
                            f"--stream_readers, the data in more files, or a smaller --block_size")
        if start is None and end == 0:
            raise UserError(f"the training stream holds fewer than one optimizer step ({self.samples_per_step} blocks "
                            f"of {self.block_size} tokens): give more data or a smaller batch / --block_size")

    def _windows(self, anchor):
        """(window of blocks, anchor of the next window) from `anchor` to the end of the stream;
        the last window holds the whole blocks that remain."""
        wanted = self.window * self.block_size
        pieces, have = [], 0
        next_anchor, offset = anchor, anchor[1]
        for before, tokens in self._token_batches(anchor[0]):
            used, offset = offset, 0  # a resume skips the anchor's offset into its first batch only
            while used < len(tokens):
                take = min(wanted - have, len(tokens) - used)
                pieces.append(tokens[used:used + take])
                have, used = have + take, used + take
                if have == wanted:
                    yield np.concatenate(pieces).reshape(self.window, self.block_size), (before, used)
                    pieces, have = [], 0
            next_anchor = (before, used)
        whole = have // self.block_size * self.block_size
        if whole:
            yield np.concatenate(pieces)[:whole].reshape(-1, self.block_size), next_anchor

    def documents(self):
        """The documents of this epoch's pass, in the order it reads them (a `datasets` IterableDataset)."""
        if not self.shuffle_shards:  # a new dataset per pass: one a state was loaded into starts every pass there
            return self.source.with_format(None)
        stream = self.source.shuffle(seed=self.seed, buffer_size=1)  # the shard order by seed + epoch, nothing buffered
        stream.set_epoch(self.epoch)
        return stream

    def _token_batches(self, state):
        """(stream state before the batch, its tokens with EOS after each document), from `state` on."""
        stream = self.documents()
        if state is not None:
            stream.load_state_dict(state)
        documents = iter(stream)
        before = state
        while batch := list(islice(documents, DOCUMENTS_PER_BATCH)):
            ids = self.encode([document[self.text_column] for document in batch])
            yield before, np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=sum(map(len, ids)))
            before = stream.state_dict()


def _read_ahead(items):
    """Iterate `items` one item ahead in a background thread. The Rust tokenizer releases the GIL,
    so the next window is read and tokenized while the model trains on the current one."""
    ahead, stop, end = queue.Queue(maxsize=1), threading.Event(), object()

    def put(item):
        """False once the consumer has stopped."""
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as error:  # raised again in the consumer, with its traceback
            put(error)

    threading.Thread(target=produce, daemon=True, name="stream-read-ahead").start()
    try:
        while (item := ahead.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the consumer stopped early (end of training): let the producer finish
