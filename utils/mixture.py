"""The order of training blocks: one source shuffled, or several drawn by weight, resumable mid-epoch.

An epoch is as many blocks as the trained sources hold together, cut to whole optimizer steps.
Each source gets its share of the epoch by weight (rounded to whole blocks, largest remainders
first), and the shares are interleaved smoothly (each draw goes to the source furthest behind its
share: after any number of draws, each source is within one block of its share), so every
optimizer step holds the mixture. A source
is read in a fresh shuffle per pass, fixed by (seed, source, pass): one whose share is larger
than itself repeats (it epochs over itself), one whose share is smaller goes on where it stopped
in the next epoch, so no block is seen twice before every block of its source has been seen once.
"""

import numpy as np
from torch.utils.data import IterableDataset, Sampler

from utils.errors import UserError


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
    n x counts[i] / total; ties to the earlier source). Pure Python, ~0.35 s per million draws."""
    total, counts = int(sum(counts)), [int(c) for c in counts]
    if max(counts) == total:  # one source: nothing to interleave
        return np.full(total, counts.index(total), dtype=np.int32)
    behind, order = [0] * len(counts), np.empty(total, dtype=np.int32)
    for n in range(total):
        best = 0
        for i, count in enumerate(counts):  # behind[i] = total x (its share of n + 1 draws - drawn)
            behind[i] += count
            if behind[i] > behind[best]:
                best = i
        behind[best] -= total
        order[n] = best
    return order


class MixtureSampler(Sampler):
    """Indices into the sources' blocks laid end to end (a torch ConcatDataset), for all processes at
    once (accelerate deals the batches out round-robin), so a position is counted in global samples and
    survives a change of process count. Implements utils/data.py TrainOrder."""

    def __init__(self, sizes, weights, samples_per_step, seed):
        weights = [w if w is not None else n for w, n in zip(weights, sizes)]  # none given: each weighs its size
        self.sizes, self.seed, self.epoch, self.skip = list(sizes), seed, 0, 0
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        trained = sum(n for n, w in zip(sizes, weights) if w > 0)
        self.usable = trained // samples_per_step * samples_per_step
        self.steps_per_epoch = self.usable // samples_per_step
        self.counts = apportion(self.usable, weights) if self.usable else np.zeros(len(sizes), np.int64)
        for n, c in zip(sizes, self.counts):
            if c and not n:
                raise UserError("a source with a positive weight has no training block: give it more data, a "
                                "smaller --block_size, or weight 0")
        self.pattern = interleave(self.counts) if self.usable else np.zeros(0, np.int32)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def position(self, samples_into_epoch):
        """What a checkpoint stores; the mixture (sizes and per-epoch counts) must match on resume."""
        return {"samples_into_epoch": samples_into_epoch, "epoch_complete": samples_into_epoch == self.usable,
                "mixture": {"sizes": self.sizes, "counts": self.counts.tolist()}}

    def start_at(self, position):
        """Skip the samples before `position` in the next epoch iterated (exact resume, no data read)."""
        saved = position.get("mixture")
        if saved and saved != self.position(0)["mixture"]:
            raise UserError(f"the training sources or their weights changed since this checkpoint (blocks per source "
                            f"{saved['sizes']}, drawn per epoch {saved['counts']}; now {self.sizes}, "
                            f"{self.counts.tolist()}): resume with the same data, or start a new --output_dir")
        self.skip = position["samples_into_epoch"]

    def drawn(self, samples):
        """Blocks drawn from each source in the first `samples` of the run."""
        epochs, into = divmod(samples, self.usable)
        return (epochs * self.counts + np.bincount(self.pattern[:into], minlength=len(self.sizes))).tolist()

    def epoch_order(self, epoch):
        """Every index of `epoch`, in order (the same on every process)."""
        order = np.empty(self.usable, dtype=np.int64)
        for i, (size, count) in enumerate(zip(self.sizes, self.counts)):
            if count:
                drawn = epoch * int(count) + np.arange(count)  # this source's draws, counted over the run
                passes = drawn // size
                picks = np.empty(count, dtype=np.int64)
                for p in np.unique(passes):
                    here = passes == p
                    picks[here] = self._shuffle(i, int(p))[drawn[here] % size]
                order[self.pattern == i] = self.offsets[i] + picks
        return order

    def _shuffle(self, source, pass_number):
        return np.random.default_rng([self.seed, source, pass_number]).permutation(self.sizes[source])

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return iter(self.epoch_order(self.epoch)[skip:].tolist())

    def __len__(self):
        return self.usable - self.skip


def mix_streams(streams, weights):
    """The training order of streamed sources (utils/stream.py StreamedBlocks): one stream as it is
    (its epochs end where it ends), several drawn by weight (MixedStreams)."""
    return streams[0] if len(streams) == 1 else MixedStreams(streams, weights)


class MixedStreams(IterableDataset):
    """Several streams drawn block by block by weight, by the same smooth rule as MixtureSampler but over
    the whole run (a stream's length is unknown, so there are no epochs): the next block comes from the
    stream furthest behind its share. A stream that runs out starts its next pass
    (new shard order and shuffle): it epochs over itself. Every optimizer step, the blocks drawn from each
    stream and each stream's own position are noted, so a checkpoint resumes exactly, re-reading at most
    one shuffle window per stream. Implements utils/data.py TrainOrder."""

    def __init__(self, streams, weights):
        self.streams, self.weights = streams, np.asarray(weights, dtype=np.float64)
        for stream in streams:
            stream.cut_to_steps(1)  # whole steps are this mixture's business, not each stream's
        self.start, self.anchors, self.steps_per_epoch = None, {}, None
        self.cut_to_steps(1)

    def cut_to_steps(self, samples_per_step):
        self.samples_per_step = samples_per_step
        return self

    def set_epoch(self, epoch):
        pass  # no epochs: each stream starts its own next pass when it runs out

    def _next(self, drawn):
        """The source furthest behind its share of the next draw (interleave's rule, with real weights)."""
        return int(np.argmax((sum(drawn) + 1) * self.weights / self.weights.sum() - np.asarray(drawn)))

    def position(self, samples_into_epoch):
        step, skip = divmod(samples_into_epoch, self.samples_per_step)
        if step not in self.anchors:
            raise RuntimeError(f"mixture position of step {step} is not known (have {sorted(self.anchors)})")
        return {"samples_into_epoch": samples_into_epoch, "epoch_complete": False, "skip": skip,
                **self.anchors[step]}

    def start_at(self, position):
        self.start = position
        step = position["samples_into_epoch"] // self.samples_per_step  # known before the stream is read again
        self.anchors = {step: {key: position[key] for key in ("drawn", "passes", "into_pass", "streams")}}

    def drawn(self, samples):
        """Blocks drawn from each stream in the first `samples` of the run (its epoch never ends)."""
        anchor = self.position(samples)
        drawn = list(anchor["drawn"])
        for _ in range(anchor["skip"]):
            drawn[self._next(drawn)] += 1
        return drawn

    def __iter__(self):
        start, self.start = self.start, None
        count = len(self.streams)
        drawn = list(start["drawn"]) if start else [0] * count  # over the whole run
        passes = list(start["passes"]) if start else [0] * count
        into_pass = list(start["into_pass"]) if start else [0] * count  # blocks drawn from the current pass
        resumed_at = list(start["streams"]) if start else [None] * count  # until a stream yields again
        iterators = []
        for stream, number, position in zip(self.streams, passes, resumed_at):
            stream.set_epoch(number)
            if position:
                stream.start_at(position)
            iterators.append(iter(stream))
        step = start["samples_into_epoch"] // self.samples_per_step if start else 0
        skip = start["skip"] if start else 0

        def snapshot():
            return {"drawn": list(drawn), "passes": list(passes), "into_pass": list(into_pass),
                    "streams": [at or (s.position(n) if n else None)
                                for s, n, at in zip(self.streams, into_pass, resumed_at)]}
        self.anchors = {step: snapshot()}
        while True:
            blocks = []
            for _ in range(self.samples_per_step):
                i = self._next(drawn)
                block = next(iterators[i], None)
                if block is None:  # this stream's pass is over: its next pass
                    if into_pass[i] == 0:
                        raise RuntimeError(f"stream {i} of the mixture holds no block")
                    passes[i], into_pass[i], resumed_at[i] = passes[i] + 1, 0, None
                    self.streams[i].set_epoch(passes[i])
                    iterators[i] = iter(self.streams[i])
                    block = next(iterators[i])
                drawn[i], into_pass[i], resumed_at[i] = drawn[i] + 1, into_pass[i] + 1, None
                if skip:
                    skip -= 1
                else:
                    blocks.append(block)
            step += 1
            self.anchors[step] = snapshot()  # before yielding: the step's end is known when its last block is
            self.anchors.pop(step - 8, None)  # the loader reads ahead a batch or two; a checkpoint lags that much
            yield from blocks
