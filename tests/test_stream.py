"""--streaming: packing on the fly, window shuffle, and exact resume that re-reads one window at most."""

import json
import shutil

import numpy as np
import pytest
from accelerate import PartialState
from conftest import TINY, launch, read_metrics, results, train_losses
from datasets import Dataset, DatasetDict, load_dataset
from transformers import AutoModelForCausalLM

from utils.errors import UserError
from utils.data import document_encoder, load_tokenizer, tokenize_and_pack
from utils.config import parse_args
from utils.sources import in_memory_source, load_source
from utils.stream import DOCUMENTS_PER_BATCH, StreamedBlocks, hold_out_validation, split_stream

DOCS = [f"document {i} " + "word " * (i * 7 % 23) + f"end {i}" for i in range(1200)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None, 300, [in_memory_source({"train": Dataset.from_dict({"text": DOCS})})], PartialState())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The documents in three JSON-lines files: a stream of three shards."""
    folder = tmp_path_factory.mktemp("shards")
    paths = []
    for n, part in enumerate(np.array_split(np.arange(len(DOCS)), 3)):
        paths.append(folder / f"part{n}.jsonl")
        paths[-1].write_text("".join(json.dumps({"text": DOCS[i]}) + "\n" for i in part))
    return [str(p) for p in paths]


class CountingEncoder:
    def __init__(self, tokenizer):
        self.encode, self.documents = document_encoder(tokenizer), 0

    def __call__(self, texts):
        self.documents += len(texts)
        return self.encode(texts)


def streamed(files, tokenizer, window, samples_per_step=4, block_size=16):
    source = load_dataset("json", data_files=files, split="train", streaming=True)
    encoder = CountingEncoder(tokenizer)
    blocks = StreamedBlocks(source, "text", encoder, block_size, window, seed=7).cut_to_steps(samples_per_step)
    return blocks, encoder


def ids(stream):
    return [tuple(b["input_ids"].tolist()) for b in stream]


def test_stream_order_matches_the_packed_token_file(shards, tokenizer):
    blocks, _ = streamed(shards[:1], tokenizer, window=1, samples_per_step=1)
    whole_file = load_dataset("json", data_files=shards[0], split="train")
    raw = DatasetDict(train=whole_file, validation=whole_file)
    packed = tokenize_and_pack([in_memory_source(raw)], tokenizer, 16, PartialState())[0]["validation"]
    assert ids(blocks) == ids(packed[i] for i in range(len(packed)))
    assert blocks.epoch_length == len(packed)


def test_epochs_are_whole_steps_shuffled_by_window_and_epoch(shards, tokenizer):
    in_order, _ = streamed(shards, tokenizer, window=1, samples_per_step=1)
    shuffled, _ = streamed(shards, tokenizer, window=10, samples_per_step=4)  # window rounds up to 12
    assert shuffled.window == 12
    first = ids(shuffled)
    assert len(first) % 4 == 0 and len(first) > 100
    assert set(first) <= set(ids(in_order)) and first != ids(in_order)[:len(first)]
    assert ids(shuffled) == first  # the same epoch gives the same order
    shuffled.set_epoch(1)
    second = ids(shuffled)
    assert second != first and len(second) == len(first)


@pytest.mark.parametrize("window", [1, 12])
def test_resume_anywhere_continues_exactly_and_reads_one_window_at_most(shards, tokenizer, window):
    blocks, encoder = streamed(shards, tokenizer, window=window)
    blocks.set_epoch(1)
    full, positions = [], {}
    for n, block in enumerate(blocks, 1):
        full.append(tuple(block["input_ids"].tolist()))
        if n % 4 == 0:  # checkpoint after a step while the loader has read one step ahead
            positions[n - 4] = json.loads(json.dumps(blocks.position(n - 4)))
    positions[len(full)] = blocks.position(len(full))
    assert positions[len(full)]["epoch_complete"] and not positions[len(full) - 4]["epoch_complete"]
    for consumed in (0, 4, 48, 52, len(full) - 4):
        resumed, encoder = streamed(shards, tokenizer, window=window)
        resumed.set_epoch(1)
        resumed.start_at(positions[consumed])
        assert ids(resumed) == full[consumed:]
    # resuming at the last step tokenizes its window's documents again, not the epoch's
    assert encoder.documents <= 2 * DOCUMENTS_PER_BATCH < len(DOCS)


def test_a_stream_shorter_than_one_step_is_an_error(shards, tokenizer):
    blocks, _ = streamed(shards[:1], tokenizer, window=1, samples_per_step=10_000)
    with pytest.raises(UserError, match="fewer than one optimizer step"):
        ids(blocks)


def test_validation_is_held_out_from_the_start_of_the_stream(shards, tokenizer, tmp_path):
    args = parse_args(["--train_file", shards[0], "--streaming", "--max_train_steps", "1", "--output_dir", str(tmp_path)])
    raw = load_source(args.sources[0], streaming=True)["splits"]
    validation, held_documents, _ = hold_out_validation(raw, "text", document_encoder(tokenizer), 16, max_eval_samples=5)
    assert len(validation) == 5
    texts = [d["text"] for d in split_stream(raw["train"], 1, held_documents)[0][0]]
    held_out = len(DOCS) // 3 - len(texts)  # just the documents that fill the validation blocks
    validation_tokens = document_encoder(tokenizer)(DOCS[:held_out])
    assert sum(map(len, validation_tokens[:-1])) < 5 * 16 <= sum(map(len, validation_tokens))
    assert texts[0] == DOCS[held_out]


@pytest.fixture(scope="module")
def six_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("six")
    for n, part in enumerate(np.array_split(np.arange(len(DOCS)), 6)):
        (folder / f"part{n}.jsonl").write_text("".join(json.dumps({"text": DOCS[i]}) + "\n" for i in part))
    return [str(folder / f"part{n}.jsonl") for n in range(6)]


@pytest.mark.parametrize("readers", [2, 3, 4])
@pytest.mark.parametrize("max_eval_samples", [5, 700, None])
@pytest.mark.parametrize("files", [3, 6])
def test_each_part_of_a_stream_holds_its_own_documents_and_none_held_out_on_every_pass(
        shards, six_shards, tokenizer, readers, max_eval_samples, files):
    """In as many parts as divide the shards, a part holds whole shards (l, l + L, ...), the same on
    every pass (which reshuffles only their order); else every L-th document, in a fixed order.
    Held-out documents are the stream's first ones (5 validation blocks: inside shard 0; 700: all of
    shard 0 and part of the next; none given: 5% of a stream read whole): no part trains on them, and
    parts on different passes never share a document."""
    files = shards if files == 3 else six_shards
    raw = {"train": load_dataset("json", data_files=files, split="train", streaming=True)}
    _, held_documents, _ = hold_out_validation(raw, "text", document_encoder(tokenizer), 16, max_eval_samples)
    if max_eval_samples == 700:
        assert len(DOCS) // 6 < held_documents < 2 * len(DOCS) // 3
    parts, shuffle_shards = split_stream(raw["train"], readers, held_documents)
    shard_ends = np.cumsum([len(x) for x in np.array_split(np.arange(len(DOCS)), len(files))])
    whole = shard_ends <= held_documents  # shards held out whole: a part of only those falls back to every L-th
    by_shards = len(files) % readers == 0 and not any(all(whole[l::readers]) for l in range(readers))
    assert shuffle_shards == by_shards
    streams = [StreamedBlocks(part, "text", None, 16, 1, 7, (l, readers), shuffle_shards) for l, part in enumerate(parts)]
    trained = sorted(DOCS[held_documents:])
    for passes in ([0] * readers, [1, 2, 0, 1][:readers], [3, 0, 2, 1][:readers]):  # parts at different passes
        texts = []
        for stream, epoch in zip(streams, passes):
            stream.set_epoch(epoch)
            texts.append([d["text"] for d in stream.documents()])
        assert sorted(text for part in texts for text in part) == trained  # each once, none held out
        if not by_shards:
            assert all(abs(len(part) - len(texts[0])) <= 1 for part in texts)
        else:  # whole shards: part 1 holds shards 1, 1 + L, ... (less what was held out)
            ones = set().union(*(np.array_split(np.arange(len(DOCS)), len(files))[j] for j in range(1, len(files), readers)))
            assert sorted(texts[1]) == sorted(DOCS[i] for i in ones if i >= held_documents)


def test_held_out_documents_filling_a_parts_shards_split_every_lth_document_instead(tokenizer):
    """4 shards of 10 documents in 4 parts: 10 held out fill shard 0, part 0's only shard (ending
    exactly at its last document), so the parts take every 4th document instead; 9 leave it one."""
    source = Dataset.from_dict({"text": DOCS[:40]}).to_iterable_dataset(num_shards=4)
    for held, by_shards in ((10, False), (9, True), (20, False)):
        parts, shuffle_shards = split_stream(source, 4, held_documents=held)
        texts = [[d["text"] for d in part] for part in parts]
        assert shuffle_shards is by_shards and all(texts), held
        assert sorted(t for part in texts for t in part) == sorted(DOCS[held:40])
    parts, _ = split_stream(source, 2, held_documents=10)  # part 0 keeps shard 2: whole shards still
    assert [d["text"] for d in parts[0]] == DOCS[20:30]


def test_a_part_left_without_a_block_names_the_part_and_the_flag(tokenizer):
    """3 documents after the held-out ones, in 4 parts (every 4th document): part 4 holds none."""
    source = Dataset.from_dict({"text": DOCS[:23]}).to_iterable_dataset(num_shards=3)
    parts, shuffle_shards = split_stream(source, 4, held_documents=20)
    blocks = StreamedBlocks(parts[3], "text", document_encoder(tokenizer), 16, 1, 7, (3, 4), shuffle_shards)
    with pytest.raises(UserError, match=r"part 4 of the training stream's 4 \(--stream_readers"):
        ids(blocks)
    assert ids(StreamedBlocks(parts[0], "text", document_encoder(tokenizer), 4, 1, 7, (0, 4), shuffle_shards))


# --- End to end: `accelerate launch train.py --streaming` ---------------------------------------

@pytest.fixture(scope="module")
def short_corpus(tmp_path_factory, corpus):
    """Twelve 1,000-character documents: a stream that ends after a few optimizer steps."""
    path = tmp_path_factory.mktemp("short") / "short.jsonl"
    texts = [json.loads(line)["text"][:1000] for line in corpus.read_text().splitlines()[:12]]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def stream_args(train_file, out):
    return ["--train_file", train_file, "--output_dir", out, *TINY, "--streaming", "--max_train_steps", 30,
            "--max_eval_samples", 8, "--stream_shuffle_blocks", 12, "--per_device_train_batch_size", 8,
            "--num_warmup_steps", 2, "--eval_steps", 30, "--checkpointing_steps", 1]


@pytest.fixture(scope="module")
def streamed_run(tmp_path_factory, short_corpus):
    """30 steps over about three passes of a short stream, with a checkpoint after every step."""
    out = tmp_path_factory.mktemp("stream") / "out"
    launch(stream_args(short_corpus, out))
    return out


def epochs_by_step(output_dir):
    return {r["step"]: r["epoch"] for r in read_metrics(output_dir) if "loss" in r}


def trainer_state(output_dir, step):
    return json.loads((output_dir / "checkpoints" / f"step_{step}" / "trainer_state.json").read_text())


def test_streaming_trains_over_several_epochs_and_saves_a_loadable_model(streamed_run):
    res = results(streamed_run)
    assert res["steps"] == 30 and res["eval_loss"] < res["initial_eval_loss"] - 0.5
    epochs = epochs_by_step(streamed_run)
    assert set(epochs.values()) >= {0, 1, 2}
    steps_per_epoch = max(s for s, e in epochs.items() if e == 0)
    assert epochs[steps_per_epoch + 1] == 1 and max(s for s, e in epochs.items() if e == 1) == 2 * steps_per_epoch
    model = AutoModelForCausalLM.from_pretrained(streamed_run)
    assert model.num_parameters() == res["parameters"]


def test_streaming_resume_continues_exactly_mid_epoch_and_at_an_epoch_end(streamed_run, short_corpus, tmp_path):
    epochs = epochs_by_step(streamed_run)
    epoch_end = max(s for s, e in epochs.items() if e == 0)
    assert trainer_state(streamed_run, epoch_end)["data_position"]["epoch_complete"]
    mid_epoch = epoch_end + 3
    assert not trainer_state(streamed_run, mid_epoch)["data_position"]["epoch_complete"]
    original = train_losses(streamed_run)
    for step in (epoch_end, mid_epoch):
        resumed = tmp_path / f"from_{step}"
        shutil.copytree(streamed_run, resumed)
        launch([*stream_args(short_corpus, resumed), "--resume_from_checkpoint", resumed / "checkpoints" / f"step_{step}"])
        again = train_losses(resumed)
        assert [again[s] for s in range(step + 1, 31)] == [original[s] for s in range(step + 1, 31)]  # bit for bit
        assert epochs_by_step(resumed) == epochs
        assert results(resumed)["eval_loss"] == results(streamed_run)["eval_loss"]


@pytest.mark.distributed
def test_streaming_with_two_processes_matches_one_and_resumes(streamed_run, short_corpus, tmp_path):
    """--stream_readers 1: only the main process reads the stream; accelerate hands each process its
    slice of the batch."""
    out = tmp_path / "ddp"
    args = [*stream_args(short_corpus, out), "--per_device_train_batch_size", 4, "--global_batch_size", 8,
            "--stream_readers", 1]
    assert "streamed in 1 part, read on the main process" in launch(args, num_processes=2,
                                                                    config_file="multi_cpu.yaml").stdout
    assert (results(out)["num_processes"], results(out)["distributed_type"]) == (2, "MULTI_CPU")
    original, losses = train_losses(streamed_run), train_losses(out)
    assert max(abs(losses[s] - original[s]) for s in original) < 1e-4
    launch([*args, "--resume_from_checkpoint", out / "checkpoints" / "step_17"], num_processes=2,
           config_file="multi_cpu.yaml")
    again = train_losses(out)
    assert max(abs(again[s] - losses[s]) for s in range(18, 31)) < 1e-6


@pytest.mark.distributed
def test_each_process_reads_its_own_part_of_the_stream_and_either_count_resumes_the_other(short_corpus, tmp_path):
    """By default each of 2 processes reads its own part (--stream_readers = the process count); one
    process reading both parts trains on the same steps, a 2-process checkpoint (each part's position
    from its own process) resumes on 1 process, and a 1-process checkpoint on 2."""
    one, two = tmp_path / "one", tmp_path / "two"

    def args(out):
        return [*stream_args(short_corpus, out), "--per_device_train_batch_size", 4, "--global_batch_size", 8]
    ddp = dict(num_processes=2, config_file="multi_cpu.yaml")
    assert "streamed in 2 parts, each process reading its own" in launch(args(two), **ddp).stdout
    assert "streamed in 2 parts, read on the main process" in launch([*args(one), "--stream_readers", 2]).stdout
    assert (results(two)["num_processes"], results(two)["config"]["stream_readers"]) == (2, 2)
    assert trainer_state(two, 17)["synced_processes"] == 2  # each flushed what it wrote before the rename
    position = trainer_state(two, 17)["data_position"]
    assert position["readers"] == 2 and all(part is not None for part in position["parts"])
    losses = {"one": train_losses(one), "two": train_losses(two)}
    assert max(abs(losses["two"][s] - losses["one"][s]) for s in losses["one"]) < 1e-4
    for out, name, elsewhere in ((two, "two", {}), (one, "one", ddp)):
        launch([*args(out), "--resume_from_checkpoint", out / "checkpoints" / "step_17"], **elsewhere)
        again = train_losses(out)
        assert max(abs(again[s] - losses[name][s]) for s in range(18, 31)) < 1e-4, name


@pytest.fixture(scope="module")
def hub_style_dataset(tmp_path_factory, corpus):
    """A dataset directory laid out like a Hub repository: train in 3 parquet shards, a validation split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("hub") / "org-corpus"
    (root / "data").mkdir(parents=True)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    for n in range(3):
        pq.write_table(pa.table({"text": texts[n * 16:(n + 1) * 16]}), root / "data" / f"train-0000{n}-of-00003.parquet")
    pq.write_table(pa.table({"text": texts[48:]}), root / "data" / "validation-00000-of-00001.parquet")
    return root


def test_stream_reshuffles_the_shard_order_every_epoch(hub_style_dataset, tokenizer, tmp_path):
    args = parse_args(["--dataset_name", str(hub_style_dataset), "--output_dir", str(tmp_path)])
    raw = load_source(args.sources[0], streaming=True)["splits"]
    assert raw["train"].num_shards == 3
    blocks = StreamedBlocks(raw["train"], "text", document_encoder(tokenizer), 64, 1, seed=0)
    orders = []
    for epoch in (0, 2):  # each pass over parquet shards ends in a 5 s pause inside `datasets` (arrow #45214)
        blocks.set_epoch(epoch)
        orders.append(ids(blocks))
    # `datasets` interleaves the shards and permutes their order by seed + epoch (3 shards: 6 orders, so
    # some epochs repeat one); in stream order (window 1) nothing else could change the blocks
    assert orders[0] != orders[1]
    assert len(orders[0]) == len(orders[1])  # the same documents, so the same number of blocks


@pytest.mark.parametrize("streaming", [False, True])
def test_dataset_by_name_from_a_hub_style_directory(streaming, hub_style_dataset, tmp_path):
    out = tmp_path / "out"
    launch(["--dataset_name", hub_style_dataset, "--output_dir", out, *TINY, "--max_train_steps", 4,
            *(["--streaming", "--max_eval_samples", 16] if streaming else [])])
    res = results(out)
    assert res["steps"] == 4 and res["eval_loss"] < res["initial_eval_loss"]
    assert res["config"]["streaming"] is streaming


def test_eval_only_on_a_stream_reproduces_the_training_eval_loss(streamed_run, short_corpus, tmp_path):
    out = tmp_path / "eval"
    launch(["--train_file", short_corpus, "--streaming", "--eval_only", "--model_name_or_path", streamed_run,
            "--output_dir", out, "--block_size", 32, "--max_eval_samples", 8])
    measured = json.loads((out / "eval_results.json").read_text())["eval_loss"]
    assert measured == pytest.approx(results(streamed_run)["eval_loss"], abs=1e-5)
