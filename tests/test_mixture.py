"""Mixtures of sources: blocks drawn by weight, per-source evaluation, exact resume (on disk and streamed).

Tolerance of the drawn shares: blocks are whole, so an epoch's share of each source is rounded to a
whole block (largest remainders: off by < 1 block), and the interleave keeps every prefix of an epoch
within 1 block of that share. After n draws a source is therefore within 2 blocks of n x its weight
share (streams: within 1, they have no epochs to round); nothing looser is accepted.
"""

import json
import shutil

import numpy as np
import pytest
from datasets import Dataset

from conftest import TINY, launch, read_metrics, results, train_losses
from utils.data import document_encoder, load_tokenizer
from utils.errors import UserError
from utils.mixture import MixedStreams, MixtureSampler, apportion, interleave, pass_key, permute
from utils.sources import in_memory_source
from utils.stream import StreamedBlocks, split_stream


# --- The order, in-process -------------------------------------------------------------------

@pytest.mark.parametrize("counts", [[3, 1], [700, 200, 100], [1, 1, 1, 997], [5, 0, 11], [2, 3, 5, 7, 11, 13, 17, 19]])
def test_interleave_keeps_every_prefix_within_one_block_of_its_share(counts):
    pattern = interleave(counts)
    total = sum(counts)
    drawn = np.cumsum(np.eye(len(counts), dtype=np.int64)[pattern], axis=0)  # drawn[n-1, i]: after n draws
    expected = np.arange(1, total + 1)[:, None] * np.array(counts)[None, :] / total
    assert np.abs(drawn - expected).max() < 1
    assert drawn[-1].tolist() == counts


def test_apportion_rounds_to_whole_blocks_by_largest_remainder():
    assert apportion(10, [1, 1, 1]).tolist() == [4, 3, 3]
    assert apportion(100, [3, 1]).tolist() == [75, 25]
    assert apportion(7, [0.5, 0, 0.25]).tolist() == [5, 0, 2]
    assert sum(apportion(1001, [0.3, 0.3, 0.4])) == 1001


def test_sampler_draws_by_weight_and_a_small_source_epochs_over_itself():
    sizes, weights = [500, 40], [1, 3]
    sampler = MixtureSampler(sizes, weights, samples_per_step=12, seed=5)
    assert sampler.usable == 540 and sampler.counts.tolist() == [135, 405]
    seen = [[], []]
    for epoch in range(4):
        sampler.set_epoch(epoch)
        order = np.array(list(sampler))
        assert len(order) == 540
        source = (order >= 500).astype(int)
        for i in (0, 1):  # every prefix: within 2 blocks of n x weight share (the module docstring)
            assert np.abs(np.cumsum(source == i) - np.arange(1, 541) * weights[i] / 4).max() <= 2
            seen[i] += (order[source == i] - [0, 500][i]).tolist()
    # the big source goes on where it stopped: no block twice before all 500 were seen once
    assert len(seen[0]) == 4 * 135 and len(set(seen[0][:500])) == 500 and len(set(seen[0][500:])) == 40
    # the small one is read in whole passes, a new shuffle each: each run of 40 is a permutation
    passes = [seen[1][k:k + 40] for k in range(0, len(seen[1]) - 39, 40)]
    assert all(sorted(p) == list(range(40)) for p in passes) and passes[0] != passes[1]
    assert sampler.drawn(540 * 2 + 100) == [2 * 135 + sum(o < 500 for o in _epoch(sampler, 2)[:100]),
                                            2 * 405 + sum(o >= 500 for o in _epoch(sampler, 2)[:100])]


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_resumes_mid_epoch_and_refuses_a_changed_mixture():
    sampler = MixtureSampler([300, 60], [2, 1], samples_per_step=10, seed=1)
    full = _epoch(sampler, 4)
    sampler.start_at(sampler.position(130))
    assert list(sampler) == full[130:]
    assert list(sampler) == full  # the skip applies to one epoch only
    changed = MixtureSampler([300, 60], [1, 1], samples_per_step=10, seed=1)
    with pytest.raises(UserError, match="changed since this checkpoint"):
        changed.start_at(sampler.position(130))


def test_a_source_of_weight_zero_is_not_trained_on():
    sampler = MixtureSampler([100, 50], [1, 0], samples_per_step=10, seed=0)
    assert sampler.usable == 100 and max(list(sampler)) < 100


def test_permute_is_a_keyed_bijection_computed_per_index():
    for size in (1, 2, 3, 7, 64, 65, 1000, 4097):
        full = permute(np.arange(size), size, pass_key(4, 1, 0))
        assert sorted(full.tolist()) == list(range(size)), size
        some = np.array([size - 1, 0, size // 2])
        assert permute(some, size, pass_key(4, 1, 0)).tolist() == full[some].tolist()  # no state, no order
    a, b = (permute(np.arange(1000), 1000, pass_key(4, 1, p)) for p in (0, 1))
    assert (a != b).mean() > 0.95 and abs(np.corrcoef(a, np.arange(1000))[0, 1]) < 0.1


def test_an_epoch_of_several_cycles_keeps_every_prefix_and_resumes_exactly(monkeypatch):
    monkeypatch.setattr("utils.mixture.CYCLE", 100)  # an epoch of 5 1/3 cycles, as at 5.3 x 2^20 blocks
    sizes, weights = [300, 170, 45], [5, 3, 1]
    sampler = MixtureSampler(sizes, weights, samples_per_step=8, seed=2)
    assert sampler.cycle == 96 and sampler.usable == 512  # 515 blocks: 64 whole steps, none dropped for cycles
    per_cycle = apportion(96, weights)
    assert sampler.counts.tolist() == (5 * per_cycle + np.bincount(sampler.pattern[:32], minlength=3)).tolist()
    orders = [_epoch(sampler, e) for e in range(3)]
    run = np.array(sum(orders, []))
    source = np.searchsorted(np.cumsum(sizes), run, side="right")
    drawn = np.cumsum(np.eye(3, dtype=np.int64)[source], axis=0)
    share = np.arange(1, 513)[:, None] * per_cycle[None, :] / 96
    for e in range(3):  # every prefix of each epoch: within one block of the cycle's share, across its cycles
        assert np.abs(drawn[512 * e:512 * (e + 1)] - (drawn[512 * e - 1] if e else 0) - share).max() < 1
    for i, n in enumerate(sizes):  # each source's passes: every block once before any twice
        seen = (run[source == i] - np.r_[0, np.cumsum(sizes)][i]).tolist()
        passes = [seen[k:k + n] for k in range(0, len(seen), n)]
        assert all(len(set(p)) == len(p) for p in passes)
    assert sampler.drawn(512 + 250) == drawn[512 + 249].tolist()
    for at in (0, 7 * 8, 96, 13 * 8, 480, 504):
        sampler.set_epoch(1)
        sampler.start_at(json.loads(json.dumps(sampler.position(at))))
        assert list(sampler) == orders[1][at:], at


def test_a_step_larger_than_a_cycle_and_a_mixture_smaller_than_a_step(monkeypatch):
    monkeypatch.setattr("utils.mixture.CYCLE", 100)
    sampler = MixtureSampler([300, 290], [1, 1], samples_per_step=128, seed=0)
    assert sampler.cycle == 128 and sampler.usable == 512  # one step per cycle, nothing dropped
    order = list(sampler)
    assert len(set(order)) == len(order) == 512 and sampler.counts.tolist() == [256, 256]
    assert MixtureSampler([10, 10], [1, 1], samples_per_step=64, seed=0).usable == 0  # refused by build_dataloaders


def test_a_checkpoint_of_the_older_order_resumes_with_a_warning(monkeypatch):
    """Order 1 counted an epoch's draws over the whole epoch; a long mixture's counts now come from its
    cycles and differ by a block or so: that is not other data, so the resume goes on, with a warning."""
    monkeypatch.setattr("utils.mixture.CYCLE", 100)
    sampler = MixtureSampler([300, 170, 45], [5, 3, 1], samples_per_step=8, seed=2)
    old = {"samples_into_epoch": 104, "epoch_complete": False,
           "mixture": {"sizes": [300, 170, 45], "counts": apportion(512, [5, 3, 1]).tolist()}}
    assert old["mixture"]["counts"] != sampler.counts.tolist()
    with pytest.warns(UserWarning, match="older version of the training order"):
        sampler.start_at(old)
    assert len(list(sampler)) == 512 - 104
    with pytest.raises(UserError, match="changed since this checkpoint"):
        sampler.start_at({**old, "mixture": {**old["mixture"], "sizes": [300, 171, 45]}})


def test_the_order_of_ten_billion_blocks_costs_what_a_million_does():
    """Nothing is held per block: the sampler of a 1e10-block mixture resumed at 90% of an epoch gives its
    first step within a few megabytes (the interleave of one cycle, one byte per position)."""
    import tracemalloc

    tracemalloc.start()
    sampler = MixtureSampler([6 * 10**9, 3 * 10**9, 10**9], [0.6, 0.3, 0.1], samples_per_step=512, seed=0)
    sampler.start_at(sampler.position(sampler.usable * 9 // 10 // 512 * 512))
    order = iter(sampler)
    step = [next(order) for _ in range(512)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, peak
    assert len(set(step)) == 512 and max(step) < 10**10
    single = MixtureSampler([10**10], [None], samples_per_step=512, seed=0)
    assert single.pattern is None and len(set(list(zip(range(1000), single)))) == 1000


# --- Streams, in-process ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def encode():
    from accelerate import PartialState

    texts = Dataset.from_dict({"text": [f"document {i} short text word" for i in range(300)]})
    return document_encoder(load_tokenizer(None, 300, [in_memory_source({"train": texts})], PartialState()))


def stream(texts, encode, window=4, readers=1, shards=2):
    """The texts as a stream of `shards` shards, in `readers` parts (utils/stream.py split_stream)."""
    source = Dataset.from_dict({"text": texts}).to_iterable_dataset(num_shards=shards)
    parts, shuffle_shards = split_stream(source, readers)
    return [StreamedBlocks(part, "text", encode, 8, window, 3, (l, readers), shuffle_shards)
            for l, part in enumerate(parts)]


BIG = [f"document {i} " + "word " * (i % 13) for i in range(400)]
SMALL = [f"short {i} text" for i in range(30)]  # a few blocks: it runs out and starts its next pass


def mixed(encode, weights=(1, 3), readers=1, reads=None, samples_per_step=4):
    return MixedStreams([stream(BIG, encode, readers=readers, shards=4), stream(SMALL, encode, readers=readers)],
                        list(weights), reads).cut_to_steps(samples_per_step)


def take(dataset, n):
    out = []
    for block in dataset:
        out.append(tuple(block["input_ids"].tolist()))
        if len(out) == n:
            break
    return out


def test_mixed_streams_draw_by_weight_repeat_a_short_stream_and_resume_exactly(encode):
    mixture, blocks, positions = mixed(encode), [], {}
    for block in mixture:
        blocks.append(tuple(block["input_ids"].tolist()))
        if len(blocks) in (40, 100, 120):  # step boundaries, some in the short stream's second pass
            positions[len(blocks)] = (json.loads(json.dumps(mixture.position(len(blocks)))),  # as a checkpoint has it
                                      mixture.drawn(len(blocks)))
        if len(blocks) == 200:
            break
    drawn = mixture.drawn(200)
    assert abs(drawn[1] - 150) < 1 and sum(drawn) == 200  # streams: no epoch rounding (module docstring)
    assert mixture.anchors[50]["parts"][0]["passes"][1] >= 1  # the short stream was read more than once
    for at, (position, drawn) in positions.items():
        again = mixed(encode)
        again.start_at(position)
        assert again.drawn(at) == drawn  # known before reading again (a run resumed at its end)
        assert take(again, 200 - at) == blocks[at:], at


def take_and_save(dataset, n, at, samples):
    """n blocks, and the position (as a checkpoint has it) after the first `at`, `samples` into the run."""
    out, position = [], None
    for block in dataset:
        out.append(tuple(block["input_ids"].tolist()))
        if len(out) == at:
            position = json.loads(json.dumps(dataset.position(samples)))
        if len(out) == n:
            return out, position


@pytest.mark.parametrize("weights", [(1, 3), (1, 0)])
def test_streams_in_parts_give_each_process_its_run_of_each_step_and_resume_on_any_split(encode, weights):
    """Each step's 4 blocks: 2 from part 0, 2 from part 1 (2 shards in 2 parts: a shard each), the
    sources drawn by the one rule over the whole step; each process reads only its part, and a
    checkpoint merges both processes' positions into one that any process count resumes."""
    one = mixed(encode, weights, readers=2)
    blocks, saved = take_and_save(one, 200, at=100, samples=100)
    by_process = [mixed(encode, weights, readers=2, reads=[r]) for r in (0, 1)]
    (first, position_0), (second_half, position_1) = [take_and_save(m, 100, at=50, samples=100) for m in by_process]
    halves = [first, second_half]
    assert not by_process[0].each_process_reads is one.each_process_reads is False
    for k in range(50):  # step k: part 0's run, then part 1's
        assert blocks[4 * k:4 * k + 4] == halves[0][2 * k:2 * k + 2] + halves[1][2 * k:2 * k + 2]
    assert one.drawn(200) == by_process[0].drawn(200) == by_process[1].drawn(200)
    if weights[1]:
        assert one.anchors[50]["parts"][1]["passes"][1] >= 1  # the short source's part 1 ran out and passed again
    merged = MixedStreams.merge([position_0, position_1])
    assert merged == saved  # what one reader of both parts saves
    again = mixed(encode, weights, readers=2)
    again.start_at(merged)
    assert take(again, 100) == blocks[100:]
    second = mixed(encode, weights, readers=2, reads=[1])
    second.start_at(merged)
    assert take(second, 50) == halves[1][50:]
    with pytest.raises(UserError, match="read in 2 parts"):
        mixed(encode, weights, readers=1).start_at(merged)


@pytest.mark.parametrize("weights, samples_per_step, readers", [((1, 1), 4, 4), ((3, 1), 4, 2), ((1, 3), 8, 2)])
def test_every_part_follows_the_weights_and_every_step_holds_the_mixture(encode, weights, samples_per_step, readers):
    """However the rule's period meets the step (1:1 with one block per part repeats every 2 draws),
    no source is pinned to some parts: each part draws each source within a block of its share, and
    each step holds S consecutive draws of the rule, within a block of each share."""
    mixture, steps = mixed(encode, weights, readers, samples_per_step=samples_per_step), 60
    share, per_part = np.array(weights) / sum(weights), samples_per_step // readers
    totals = [np.zeros(2)]
    for n, _ in enumerate(mixture):
        if (n + 1) % samples_per_step == 0:
            totals.append(np.array(mixture.anchors[(n + 1) // samples_per_step]["drawn"]))
            if len(totals) == steps + 1:
                break
    for part in mixture.anchors[steps]["parts"]:
        assert np.abs(np.array(part["drawn"]) - share * steps * per_part).max() <= 1, part["drawn"]
    for before, after in zip(totals, totals[1:]):
        assert np.abs(after - before - share * samples_per_step).max() <= 1


@pytest.mark.parametrize("readers", [3, 4])
def test_parts_of_every_lth_document_resume_exactly_across_their_next_passes(encode, readers, monkeypatch):
    """BIG's 4 shards in 3 parts and SMALL's 2 in 3 or 4: every L-th document, in a fixed order. After a
    resume, each part's later passes start at the part's beginning again, not where the resume did
    (read 2 documents at a time, so a part resumes from a `datasets` state inside its pass)."""
    monkeypatch.setattr("utils.stream.DOCUMENTS_PER_BATCH", 2)
    samples_per_step = 12 if readers == 3 else 4
    blocks, position = take_and_save(mixed(encode, readers=readers, samples_per_step=samples_per_step), 240,
                                     at=120, samples=120)
    again = mixed(encode, readers=readers, samples_per_step=samples_per_step)
    again.start_at(position)
    assert take(again, 120) == blocks[120:]
    assert again.anchors[max(again.anchors)]["parts"][0]["passes"][1] >= 2  # SMALL's part passed again after the resume


def test_a_checkpoint_of_mixed_streams_before_parts_resumes_as_one_part(encode):
    blocks, position = take_and_save(mixed(encode), 120, at=80, samples=80)
    part = position.pop("parts")[0]
    del position["readers"], position["rule"], part["drawn"]
    older = {**position, **part, "skip": 0}  # the format before --stream_readers
    again = mixed(encode)
    again.start_at(older)
    assert take(again, 40) == blocks[80:]


# --- Real launches ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_source(tmp_path_factory):
    """A second domain, small enough to run out within a short run (about 25 blocks of 32 tokens)."""
    path = tmp_path_factory.mktemp("small") / "numbers.txt"
    path.write_text("\n\n".join(f"The number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(80)))
    return path


def mixture_args(corpus, small_source, out, *extra):
    return ["--train_file", corpus, small_source, "--train_weights", 1, 3, "--output_dir", out, *TINY,
            "--max_train_steps", 12, "--eval_steps", 6, "--checkpointing_steps", 4, *extra]


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory, corpus, small_source):
    out = tmp_path_factory.mktemp("mixture") / "run"
    launch(mixture_args(corpus, small_source, out))
    return out


def test_mixture_draws_by_weight_and_evaluates_each_source(mixture_run, corpus, small_source, tmp_path):
    res = results(mixture_run)
    sources = {s["source"]: s for s in res["sources"]}
    assert list(sources) == ["corpus", "numbers"]
    blocks = [sources[name]["train_tokens"] / 32 for name in sources]
    assert sum(blocks) == 12 * 4 and abs(blocks[1] - 12 * 4 * 3 / 4) <= 2  # tolerance: module docstring
    assert sources["corpus"]["identity"]["path"] == str(corpus) and sources["numbers"]["weight"] == 3
    evals = [r for r in read_metrics(mixture_run) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert all({"eval_loss/corpus", "eval_loss/numbers"} <= set(r) for r in evals)
    assert evals[-1]["eval_loss/numbers"] == pytest.approx(sources["numbers"]["eval_loss"])
    assert "## Sources" in (mixture_run / "report.md").read_text()
    assert (mixture_run / "plots" / "eval_loss_by_source.png").is_file()
    # each source's loss is the loss of that source alone, through the same pipeline (its own held-out part)
    for name, path in (("corpus", corpus), ("numbers", small_source)):
        alone = tmp_path / name
        launch(["--train_file", path, "--eval_only", "--model_name_or_path", mixture_run, "--output_dir", alone,
                "--block_size", 32, "--per_device_eval_batch_size", 8])
        measured = json.loads((alone / "eval_results.json").read_text())["eval_loss"]
        assert measured == pytest.approx(sources[name]["eval_loss"], rel=1e-5)


def test_mixture_resumes_exactly(mixture_run, corpus, small_source, tmp_path):
    original = train_losses(mixture_run)
    resumed = tmp_path / "resumed"
    shutil.copytree(mixture_run, resumed)
    launch([*mixture_args(corpus, small_source, resumed), "--resume_from_checkpoint",
            resumed / "checkpoints" / "step_8"])
    again = train_losses(resumed)
    assert [again[s] for s in range(9, 13)] == [original[s] for s in range(9, 13)]  # bit for bit
    assert results(resumed)["sources"] == results(mixture_run)["sources"]


def test_a_mixture_from_a_prepared_store_trains_like_the_in_job_mixture(mixture_run, corpus, small_source, tmp_path):
    from test_store import prepare, train

    store = tmp_path / "store"
    done = prepare("--train_file", corpus, small_source, "--tokenizer_name", mixture_run, "--data_dir", store)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "source 0 corpus" in done.stdout and "source 1 numbers" in done.stdout
    refused = train("--data_dir", store, "--train_weights", 1, "--output_dir", tmp_path / "bad")
    assert refused.returncode == 2 and "1 values for the 2 sources of token store" in refused.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()
    # a recipe's datasets: entries name the store's sources (listed in another order than the store's)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"datasets:\n  - {{path: '{small_source}', weight: 3}}\n  - {{path: '{corpus}', weight: 1}}\n")
    out = tmp_path / "from_store"
    args = mixture_args(corpus, small_source, out)
    launch(["--config", recipe, "--data_dir", store, *args[args.index("--output_dir"):]])
    assert train_losses(out) == train_losses(mixture_run)  # the same blocks in the same order, bit for bit
    assert [(s["source"], s["weight"], s["train_tokens"]) for s in results(out)["sources"]] == [
        (s["source"], s["weight"], s["train_tokens"]) for s in results(mixture_run)["sources"]]


def test_recipe_weights_reach_a_stores_sources_by_name(tmp_path):
    from utils.sources import store_weights

    sources = [{"label": "topics", "identity": {"path": "/d/topics.jsonl", "bytes": 1, "mtime_ns": 1}},
               {"label": "code", "identity": {"files": [{"path": "/d/code/a.jsonl"}, {"path": "/d/code/b.jsonl"}]}},
               {"label": "web", "identity": {"name": "org/web", "config": "en", "split": "train"}}]
    assert store_weights(sources, [{"name": "org/web", "config": "en", "weight": 5}, {"path": "/d/code/*.jsonl", "weight": 3},
                                   {"path": "/d/topics.jsonl", "weight": 1}], "S") == [1, 3, 5]
    assert store_weights(sources, [{"label": "web", "path": "x", "weight": 2}, {"label": "code", "path": "y", "weight": 0},
                                   {"label": "topics", "path": "z", "weight": 1}], "S") == [1, 0, 2]
    assert store_weights(sources, [{"path": "/d/topics.jsonl"}, {"path": "/d/code/*"}, {"name": "org/web", "config": "en"}],
                         "S") is None
    same_file = [{"label": "a", "identity": {"path": "/d/x.jsonl"}}, {"label": "b", "identity": {"path": "/d/x.jsonl"}}]
    with pytest.raises(UserError, match="names more than one source"):  # two text columns of one file: use labels
        store_weights(same_file, [{"path": "/d/x.jsonl", "weight": 1}, {"label": "b", "path": "-", "weight": 1}], "S")
    # the same recipe that prepared a store: no config is none, no split is train, * stays in one folder
    two = [{"label": "web", "identity": {"name": "org/web", "config": None, "split": "train"}},
           {"label": "extra", "identity": {"name": "org/web", "config": None, "split": "extra"}},
           {"label": "web-en", "identity": {"name": "org/web", "config": "en", "split": "train"}},
           {"label": "new", "identity": {"files": [{"path": "/d/web/a.jsonl"}, {"path": "/d/web/b.jsonl"}]}},
           {"label": "old", "identity": {"files": [{"path": "/d/web/old/a.jsonl"}, {"path": "/d/web/.old/x.jsonl"}]}}]
    with pytest.raises(UserError, match="entry 4 .* names no source"):  # hidden folders are not matched by *
        store_weights(two, [{"name": "org/web", "weight": 1}, {"name": "org/web", "split": "extra", "weight": 2},
                            {"name": "org/web", "config": "en", "weight": 3}, {"path": "/d/web/*.jsonl", "weight": 4},
                            {"path": "/d/web/*/*.jsonl", "weight": 5}], "S")
    two[4]["identity"]["files"][1]["path"] = "/d/web/older/x.jsonl"
    assert store_weights(two, [{"name": "org/web", "weight": 1}, {"name": "org/web", "split": "extra", "weight": 2},
                               {"name": "org/web", "config": "en", "weight": 3}, {"path": "/d/web/*.jsonl", "weight": 4},
                               {"path": "/d/web/*/*.jsonl", "weight": 5}], "S") == [1, 2, 3, 4, 5]
    for entries, message in [
            ([{"path": "/d/other.jsonl", "weight": 1}], r"entry 0 \(/d/other.jsonl\) names no source of token store S"),
            ([{"name": "org/web", "config": "fr", "weight": 1}], "names no source"),
            ([{"path": "/d/topics.jsonl", "weight": 1}, {"label": "topics", "path": "q", "weight": 2}], "twice"),
            ([{"path": "/d/topics.jsonl", "weight": 1}, {"name": "org/web", "config": "en", "weight": 2}], "no weight to code")]:
        with pytest.raises(UserError, match=message):
            store_weights(sources, entries, "S")


def test_streamed_mixture_trains_by_weight_and_resumes_exactly(corpus, small_source, tmp_path):
    out = tmp_path / "streamed"
    args = mixture_args(corpus, small_source, out, "--streaming", "--max_eval_samples", 4,
                        "--stream_shuffle_blocks", 8)
    launch(args)
    res = results(out)
    drawn = [s["train_tokens"] / 32 for s in res["sources"]]
    assert sum(drawn) == 48 and abs(drawn[1] - 36) <= 1
    original = train_losses(out)
    for step in (4, 8):
        resumed = tmp_path / f"from_{step}"
        shutil.copytree(out, resumed)
        launch([*args[:args.index("--output_dir") + 1], resumed, *args[args.index("--output_dir") + 2:],
                "--resume_from_checkpoint", resumed / "checkpoints" / f"step_{step}"])
        again = train_losses(resumed)
        assert [again[s] for s in range(step + 1, 13)] == [original[s] for s in range(step + 1, 13)], step
    from test_store import train  # a stream saved at 1:3 does not resume at 3:1

    other = [*args[:args.index("--train_weights")], "--train_weights", 3, 1, *args[args.index("--train_weights") + 3:]]
    refused = train(*other, "--resume_from_checkpoint", out / "checkpoints" / "step_8")
    assert refused.returncode == 2 and "training data changed" in refused.stderr.strip().splitlines()[-1]
    more_eval = [*args[:args.index("--max_eval_samples")], "--max_eval_samples", 6, *args[args.index("--max_eval_samples") + 2:]]
    refused = train(*more_eval, "--resume_from_checkpoint", out / "checkpoints" / "step_8")  # other documents held out
    assert refused.returncode == 2 and "held_out" in refused.stderr.strip().splitlines()[-1], refused.stderr[-2000:]


@pytest.mark.distributed
def test_a_streamed_mixture_read_in_parts_by_two_processes_matches_one_and_resumes_on_one(corpus, small_source,
                                                                                           tmp_path):
    """Two streams, each in 2 parts: each of 2 processes reads its part of both (the short one runs out
    and passes again per part); one process reading all parts draws the same blocks; the 2-process
    checkpoint resumes on 1."""
    def args(out):
        return mixture_args(corpus, small_source, out, "--streaming", "--max_eval_samples", 4, "--stream_shuffle_blocks",
                            8, "--per_device_train_batch_size", 2, "--global_batch_size", 4)
    one, two = tmp_path / "one", tmp_path / "two"
    assert "each process reading its own" in launch(args(two), num_processes=2, config_file="multi_cpu.yaml").stdout
    launch([*args(one), "--stream_readers", 2])
    assert [s["train_tokens"] for s in results(one)["sources"]] == [s["train_tokens"] for s in results(two)["sources"]]
    losses = train_losses(two)
    assert max(abs(losses[s] - train_losses(one)[s]) for s in losses) < 1e-4
    launch([*args(two), "--resume_from_checkpoint", two / "checkpoints" / "step_8"])
    again = train_losses(two)
    assert max(abs(again[s] - losses[s]) for s in range(9, 13)) < 1e-4


def test_a_resume_on_other_data_is_refused_at_every_step_even_at_an_epochs_end(tmp_path):
    """Changed weights, or a source swapped for another of the same size, refused whether the checkpoint
    is mid-epoch or after an epoch's last step (its draws and position belong to the old mixture)."""
    from test_store import train

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n\n".join(f"Alpha line {i} has some words in it." for i in range(120)))
    b.write_text("\n\n".join(f"beta {i} is a short line" for i in range(200)))
    out = tmp_path / "run"
    args = ["--train_file", a, b, "--output_dir", out, *TINY, "--num_train_epochs", 1, "--checkpointing_steps", 1,
            "--eval_steps", 1000]
    first = train(*args, "--train_weights", 1, 1)
    assert first.returncode == 0, first.stderr[-3000:]
    state = json.loads(sorted((out / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))[-1].joinpath(
        "trainer_state.json").read_text())
    assert state["data_position"]["epoch_complete"]  # the newest checkpoint is after the epoch's last step
    for checkpoint in ("latest", out / "checkpoints" / "step_1"):
        refused = train(*args, "--num_train_epochs", 2, "--train_weights", 9, 1, "--resume_from_checkpoint", checkpoint)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert "training data changed" in refused.stderr.strip().splitlines()[-1] and "weight 0.5 -> 0.9" in refused.stderr
    other_tokenizer = train(*args, "--num_train_epochs", 2, "--train_weights", 1, 1, "--tokenizer_sample_documents", 2,
                            "--resume_from_checkpoint", "latest")  # a tokenizer trained here on another sample
    assert other_tokenizer.returncode == 2 and "another tokenizer" in other_tokenizer.stderr.strip().splitlines()[-1]
    b.write_text(b.read_text().upper())  # the same size, other text (tokenized by the checkpoint's own tokenizer)
    newest = sorted((out / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))[-1]
    swapped = train(*args, "--num_train_epochs", 2, "--train_weights", 1, 1, "--tokenizer_name", newest,
                    "--resume_from_checkpoint", "latest")
    assert swapped.returncode == 2 and "content" in swapped.stderr.strip().splitlines()[-1], swapped.stderr[-3000:]


@pytest.mark.distributed
def test_mixture_on_two_processes_matches_one_and_resumes(mixture_run, corpus, small_source, tmp_path):
    out = tmp_path / "ddp"
    args = [*mixture_args(corpus, small_source, out), "--per_device_train_batch_size", 2, "--global_batch_size", 4]
    launch(args, num_processes=2, config_file="multi_cpu.yaml")
    assert (results(out)["num_processes"], results(out)["distributed_type"]) == (2, "MULTI_CPU")
    original, losses = train_losses(mixture_run), train_losses(out)
    assert max(abs(losses[s] - original[s]) for s in original) < 1e-4
    assert [s["train_tokens"] for s in results(out)["sources"]] == [s["train_tokens"] for s in
                                                                    results(mixture_run)["sources"]]
    launch([*args, "--resume_from_checkpoint", out / "checkpoints" / "step_8"], num_processes=1)  # 2 -> 1 process
    again = train_losses(out)
    assert max(abs(again[s] - losses[s]) for s in range(9, 13)) < 1e-4
