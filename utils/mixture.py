"""The order of training blocks: one source shuffled, or several drawn by weight, resumable mid-epoch.

An epoch is as many blocks as the trained sources hold together, cut to whole optimizer steps.
Each source gets its share of the epoch by weight (rounded to whole blocks, largest remainders
first), and the shares are interleaved smoothly (each draw goes to the source furthest behind its
share: after any number of draws, each source is within one block of its share), so every
optimizer step holds the mixture. A source is read in a fresh shuffle per pass, fixed by (seed,
source, pass): one whose share is larger than itself repeats (it epochs over itself), one whose
share is smaller goes on where it stopped in the next epoch, so no block is seen twice before every
block of its source has been seen once.

Nothing here grows with the corpus: the block at any position of the run is computed from the
position alone (a keyed permutation per source pass, evaluated per index; an interleave that repeats
every cycle of at most CYCLE positions), so memory, the time to the first batch and the time to
resume are the same at a million blocks and at ten billion (benchmarks/data_scale.py). An epoch
longer than CYCLE is cut into cycles of CYCLE positions rounded down to whole steps, each with the
same per-source counts (the last one cut short: every prefix of a cycle keeps the rule): weights are
then rounded to whole blocks of a cycle (a share's precision is 1 / CYCLE, about 1e-6).
"""

import warnings

import numpy as np
from torch.utils.data import IterableDataset, Sampler

from utils.errors import UserError

CYCLE = 1 << 20  # mixture positions whose interleave is computed (5 bytes each): ~0.3-0.7 s at start
CHUNK = 1 << 14  # positions turned into block indices at once while iterating
ROUNDS = 8  # Feistel rounds of the per-source permutation
ORDER = 2  # 2: keyed permutations, cycles (1: numpy permutations of whole passes, one interleave per epoch)


def apportion(total, weights):
    """`total` whole blocks split by `weights` (largest remainders; ties to the earlier source)."""
    weights = np.asarray(weights, dtype=np.float64)
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    for i in sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))[:total - counts.sum()]:
        counts[i] += 1
    return counts


def interleave(counts):
    """Source numbers, `counts[i]` of source i, spread evenly: each draw goes to the source furthest
    behind its share (smooth weighted round-robin: after n draws, source i is within one block of
    n x counts[i] / total; ties to the earlier source). Pure Python, 0.3-0.7 s per million draws."""
    total, counts = int(sum(counts)), [int(c) for c in counts]
    behind, order = [0] * len(counts), np.empty(total, dtype=np.int8 if len(counts) < 128 else np.int32)
    for n in range(total):
        best = 0
        for i, count in enumerate(counts):  # behind[i] = total x (its share of n + 1 draws - drawn)
            behind[i] += count
            if behind[i] > behind[best]:
                best = i
        behind[best] -= total
        order[n] = best
    return order


_MASK64 = (1 << 64) - 1


def _mix(x):
    """splitmix64's finalizer: a well-mixed 64-bit hash (numpy uint64 arrays wrap, Python ints are masked)."""
    if isinstance(x, int):
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
        return x ^ (x >> 31)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(indices, size, key):
    """Where `indices` (in [0, size)) go in a pseudo-random permutation of range(size) fixed by `key`,
    computed per index in O(1) memory: a Feistel network over the smallest power of two that holds
    `size` (a bijection there), walked again from any result >= size until it lands below (cycle
    walking: a bijection of [0, size), fewer than 2 rounds of walking on average)."""
    indices = np.asarray(indices, dtype=np.uint64)
    if size <= 1:
        return indices.astype(np.int64)
    bits = int(size - 1).bit_length()
    right = (bits + 1) // 2  # the halves: `right` low bits and bits - right high bits
    low, high = np.uint64((1 << right) - 1), np.uint64((1 << (bits - right)) - 1)
    keys = [np.uint64(_mix(key ^ _mix(r + 1))) for r in range(ROUNDS)]

    def encrypt(x):
        left, rest = x >> np.uint64(right), x & low
        for r, k in enumerate(keys):  # each round changes one half by a hash of the other: invertible
            if r % 2:
                rest ^= _mix(left ^ k) & low
            else:
                left ^= _mix(rest ^ k) & high
        return (left << np.uint64(right)) | rest

    out, todo = indices.copy(), np.arange(len(indices))
    while len(todo):
        out[todo] = encrypt(out[todo])
        todo = todo[out[todo] >= np.uint64(size)]
    return out.astype(np.int64)


def pass_key(seed, source, pass_number):
    """The permutation key of one pass over one source."""
    return _mix(_mix(_mix(seed & _MASK64) ^ source) ^ pass_number)


class MixtureSampler(Sampler):
    """Indices into the sources' blocks laid end to end (a torch ConcatDataset), for all processes at
    once (accelerate deals the batches out round-robin), so a position is counted in global samples and
    survives a change of process count. Implements utils/data.py TrainOrder."""

    each_process_reads = False  # one order for the job

    def __init__(self, sizes, weights, samples_per_step, seed):
        weights = [w if w is not None else n for w, n in zip(weights, sizes)]  # none given: each weighs its size
        self.sizes, self.seed, self.epoch, self.skip = list(sizes), seed, 0, 0
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        trained = sum(n for n, w in zip(sizes, weights) if w > 0)
        self.usable = trained // samples_per_step * samples_per_step
        self.steps_per_epoch = self.usable // samples_per_step
        mixed = sum(1 for n, w in zip(sizes, weights) if w > 0 and n) > 1
        # positions per cycle: whole steps, at most CYCLE (or one step); the epoch's last cycle may be cut short
        self.cycle = min(self.usable, max(CYCLE // samples_per_step, 1) * samples_per_step) if mixed else self.usable
        self.per_cycle = apportion(self.cycle, weights) if self.usable else np.zeros(len(sizes), np.int64)
        self.pattern = self.rank = None  # one trained source: its draws are the positions themselves
        if mixed and self.usable:
            self.pattern = interleave(self.per_cycle)  # the source of each position of a cycle
            self.rank = np.empty(self.cycle, dtype=np.int32)  # that source's draws before it in the cycle
            for i, count in enumerate(self.per_cycle):
                self.rank[self.pattern == i] = np.arange(count, dtype=np.int32)
            self.counts = self._drawn_in_epoch(self.usable)  # per epoch
            for label, (n, w, c) in enumerate(zip(sizes, weights, self.per_cycle)):
                if n and w > 0 and not c:
                    warnings.warn(f"source {label}'s weight is below one block in {self.cycle:,}: it is not drawn")
        else:  # one trained source (or no step): a single cycle, the whole epoch
            self.counts = self.per_cycle
        for n, c in zip(sizes, self.counts):
            if c and not n:
                raise UserError("a source with a positive weight has no training block: give it more data, a "
                                "smaller --block_size, or weight 0")
        self.only = int(np.argmax(self.counts))

    def _drawn_in_epoch(self, samples):
        """Blocks drawn from each source in the first `samples` positions of an epoch (mixtures)."""
        cycles, into = divmod(samples, self.cycle)
        return cycles * self.per_cycle + np.bincount(self.pattern[:into], minlength=len(self.sizes))

    def set_epoch(self, epoch):
        self.epoch = epoch

    def position(self, samples_into_epoch):
        """What a checkpoint stores; the mixture (sizes and per-epoch counts) must match on resume."""
        return {"samples_into_epoch": samples_into_epoch, "epoch_complete": samples_into_epoch == self.usable,
                "mixture": {"sizes": self.sizes, "counts": self.counts.tolist()}, "order": ORDER}

    def start_at(self, position):
        """Skip the samples before `position` in the next epoch iterated (exact resume, no data read)."""
        saved, now = position.get("mixture"), self.position(0)["mixture"]
        if position.get("order", 1) != ORDER:  # per-epoch counts were rounded differently: compare the sources
            if saved and saved["sizes"] != now["sizes"]:
                raise self._changed(saved)
            if 0 < position["samples_into_epoch"] < self.usable:
                warnings.warn("this checkpoint was written by an older version of the training order: the rest of its "
                              "epoch is drawn in the new order (some of the epoch's blocks may be seen twice, others "
                              "not at all); later epochs are whole")
        elif saved and saved != now:
            raise self._changed(saved)
        self.skip = min(position["samples_into_epoch"], self.usable)

    def _changed(self, saved):
        return UserError(f"the training sources or their weights changed since this checkpoint (blocks per source "
                         f"{saved['sizes']}, drawn per epoch {saved['counts']}; now {self.sizes}, "
                         f"{self.counts.tolist()}): resume with the same data, or start a new --output_dir")

    def drawn(self, samples):
        """Blocks drawn from each source in the first `samples` of the run."""
        if self.pattern is None:
            return [samples if i == self.only else 0 for i in range(len(self.sizes))]
        epochs, into = divmod(samples, self.usable)
        return (epochs * self.counts + self._drawn_in_epoch(into)).tolist()

    def blocks(self, first, end):
        """The block indices at positions [first, end) of the run (positions count from its first sample)."""
        position = np.arange(first, end, dtype=np.int64)
        if self.pattern is None:
            source, draws = np.full(len(position), self.only), position
        else:
            epochs, into = np.divmod(position, self.usable)
            cycles, into = np.divmod(into, self.cycle)
            source = self.pattern[into].astype(np.int64)
            # the source's draws before this one: in earlier epochs, earlier cycles, earlier in this cycle
            draws = epochs * self.counts[source] + cycles * self.per_cycle[source] + self.rank[into]
        sizes = np.asarray(self.sizes, dtype=np.int64)[source]
        passes, within = np.divmod(draws, sizes)
        out = np.empty(len(position), dtype=np.int64)
        for i in np.unique(source):
            for p in np.unique(passes[source == i]):
                here = (source == i) & (passes == p)
                out[here] = self.offsets[i] + permute(within[here], self.sizes[i], pass_key(self.seed, int(i), int(p)))
        return out

    def __iter__(self):
        skip, self.skip = self.skip, 0
        start, end = self.epoch * self.usable + skip, (self.epoch + 1) * self.usable
        for first in range(start, end, CHUNK):
            yield from self.blocks(first, min(first + CHUNK, end)).tolist()

    def __len__(self):
        return self.usable - self.skip


def mix_streams(streams, weights, reads=None):
    """The training order of streamed sources, each in parts (utils/stream.py: streams[i][l] is source
    i's part l, a StreamedBlocks): one source in one part as it is (its epochs end where it ends);
    else MixedStreams, of which this process reads the parts `reads` (all by default)."""
    if len(streams) == 1 and len(streams[0]) == 1:
        return streams[0][0]
    return MixedStreams(streams, weights, reads)


class MixedStreams(IterableDataset):
    """Streams drawn block by block by weight, by the same smooth rule as MixtureSampler but over the
    whole run (a stream's length is unknown, so there are no epochs): the next block comes from the
    source furthest behind its share. Each source is read in L parts (--stream_readers), and each
    optimizer step takes m = S / L blocks from each part l: the sources of the rule's draws
    [(k + l) m, (k + l + 1) m) at step k. So the step holds S consecutive draws of the rule (within a
    block of every share), each part follows the rule on its own (within a block of every share: no
    source is pinned to some parts), and a process reads only its own parts yet knows the whole
    step's draws. A part that runs out starts its next pass (new shard order and shuffle): it epochs
    over itself. Every optimizer step, the rule's state, the blocks trained from each source and each
    part's own position are noted, so a checkpoint resumes exactly, re-reading at most one shuffle
    window per part; each process notes only its parts (utils/checkpoint.py gathers them).
    Implements utils/data.py TrainOrder."""

    def __init__(self, streams, weights, reads=None):
        self.streams, self.weights = streams, np.asarray(weights, dtype=np.float64)
        self.readers = len(streams[0])
        self.reads = list(range(self.readers) if reads is None else reads)
        self.each_process_reads = len(self.reads) < self.readers  # else the main process reads every part
        for parts in streams:
            for stream in parts:
                stream.cut_to_steps(1)  # whole steps are this mixture's business, not each stream's
        self.start, self.anchors, self.steps_per_epoch = None, {}, None
        self.cut_to_steps(self.readers)

    def cut_to_steps(self, samples_per_step):
        if samples_per_step % self.readers:
            raise ValueError(f"a step of {samples_per_step} blocks is not a multiple of {self.readers} stream parts")
        self.samples_per_step = samples_per_step
        return self

    def set_epoch(self, epoch):
        pass  # no epochs: each part starts its own next pass when it runs out

    def _next(self, drawn):
        """The source furthest behind its share of the next draw (interleave's rule, with real weights)."""
        return int(np.argmax((sum(drawn) + 1) * self.weights / self.weights.sum() - np.asarray(drawn)))

    def position(self, samples_into_epoch):
        """Where the run stands (JSON-able), at a step's end; `parts` holds None for the parts other
        processes read."""
        step, skip = divmod(samples_into_epoch, self.samples_per_step)
        if skip or step not in self.anchors:
            raise RuntimeError(f"mixture position of step {step} (+{skip}) is not known (have {sorted(self.anchors)})")
        return {"samples_into_epoch": samples_into_epoch, "epoch_complete": False, "readers": self.readers,
                **self.anchors[step]}

    @staticmethod
    def merge(positions):
        """One position from every process's position(): each part's state from the process that reads it."""
        merged = dict(positions[0])
        merged["parts"] = [next((p["parts"][l] for p in positions if p["parts"][l] is not None), None)
                           for l in range(len(merged["parts"]))]
        return merged

    def start_at(self, position):
        if "parts" not in position:  # a checkpoint of one reader before parts: its one part's state
            position = {**position, "parts": [{key: position[key] for key in ("passes", "into_pass", "streams")}]}
        if position.get("readers", 1) != self.readers:
            raise UserError(f"the checkpoint's streams were read in {position.get('readers', 1)} parts, this run's in "
                            f"{self.readers}: resume without --stream_readers")
        if position.get("skip"):
            raise UserError("the checkpoint's stream position is inside an optimizer step: resume from another")
        self.start = position
        step = position["samples_into_epoch"] // self.samples_per_step  # known before the stream is read again
        self.anchors = {step: {"drawn": position["drawn"], "rule": position.get("rule", position["drawn"]),
                               "parts": [part if l in self.reads else None for l, part in enumerate(position["parts"])]}}

    def drawn(self, samples):
        """Blocks trained from each source in the first `samples` (whole steps) of the run, on every part."""
        return list(self.position(samples)["drawn"])

    def __iter__(self):
        start, self.start = self.start, None
        count, share = len(self.streams), self.samples_per_step // self.readers
        drawn = list(start["drawn"]) if start else [0] * count  # blocks trained per source, all parts
        rule = list(start.get("rule", start["drawn"])) if start else [0] * count  # the rule's draws before `ahead`
        saved = start["parts"] if start else [None] * self.readers
        parts = {l: _PartReader([parts[l] for parts in self.streams], saved[l]) for l in self.reads}
        step = start["samples_into_epoch"] // self.samples_per_step if start else 0
        ahead, counted = [], list(rule)  # the rule's next S draws; `counted` includes them

        def snapshot():
            return {"drawn": list(drawn), "rule": list(rule),
                    "parts": [parts[l].state() if l in parts else None for l in range(self.readers)]}
        self.anchors = {step: snapshot()}
        while True:
            while len(ahead) < self.samples_per_step:  # every process draws the whole step (S / L new per step)
                ahead.append(self._next(counted))
                counted[ahead[-1]] += 1
            blocks = []
            for l in self.reads:  # part l: draws [(k + l) m, (k + l + 1) m)
                blocks += [parts[l].draw(i) for i in ahead[l * share:(l + 1) * share]]
            for i in ahead:
                drawn[i] += 1
            for i in ahead[:share]:
                rule[i] += 1
            del ahead[:share]
            step += 1
            self.anchors[step] = snapshot()  # before yielding: the step's end is known when its last block is
            self.anchors.pop(step - 8, None)  # the loader reads ahead a batch or two; a checkpoint lags that much
            yield from blocks


class _PartReader:
    """One part l of every source (streams[i] is source i's part l): the blocks drawn from each, its
    passes, the blocks drawn from the current pass, and where each stream resumed (until it yields again)."""

    def __init__(self, streams, saved=None):
        count = len(streams)
        self.streams = streams
        self.drawn = list(saved["drawn"]) if saved and "drawn" in saved else [0] * count  # before parts: not kept
        self.passes = list(saved["passes"]) if saved else [0] * count
        self.into_pass = list(saved["into_pass"]) if saved else [0] * count
        self.resumed_at = list(saved["streams"]) if saved else [None] * count
        self.iterators = []
        for stream, number, position in zip(streams, self.passes, self.resumed_at):
            stream.set_epoch(number)
            if position:
                stream.start_at(position)
            self.iterators.append(iter(stream))

    def draw(self, i):
        block = next(self.iterators[i], None)
        if block is None:  # this stream's pass is over: its next pass
            if self.into_pass[i] == 0:
                raise RuntimeError(f"stream {i} of the mixture holds no block")
            self.passes[i], self.into_pass[i], self.resumed_at[i] = self.passes[i] + 1, 0, None
            self.streams[i].set_epoch(self.passes[i])
            self.iterators[i] = iter(self.streams[i])
            block = next(self.iterators[i])
        self.drawn[i], self.into_pass[i], self.resumed_at[i] = self.drawn[i] + 1, self.into_pass[i] + 1, None
        return block

    def state(self):
        return {"drawn": list(self.drawn), "passes": list(self.passes), "into_pass": list(self.into_pass),
                "streams": [at or (s.position(n) if n else None)
                            for s, n, at in zip(self.streams, self.into_pass, self.resumed_at)]}
