"""Packing, tokenizer training and the resumable sampler, without launching training."""


import numpy as np
import pytest
from accelerate import PartialState
from datasets import Dataset, DatasetDict

from utils.errors import UserError
from utils.data import load_tokenizer, tokenize_and_pack
from utils.mixture import MixtureSampler
from utils.sources import in_memory_source

DOCS = [f"document {i} " + "word " * (i * 7 % 23) for i in range(200)]


@pytest.fixture(scope="module")
def tokenizer():
    raw = Dataset.from_dict({"text": DOCS})
    return load_tokenizer(None, 300, [in_memory_source({"train": raw})], PartialState())


def pack(docs, tokenizer, block_size=16):
    raw = DatasetDict(train=Dataset.from_dict({"text": docs}), validation=Dataset.from_dict({"text": docs[:50]}))
    return tokenize_and_pack([in_memory_source(raw)], tokenizer, block_size, PartialState())[0]


def test_packing_keeps_every_token_with_eos_between_documents(tokenizer):
    blocks = pack(DOCS, tokenizer)["train"]
    expected = []
    for doc in DOCS:
        expected += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    stream = np.concatenate([blocks[i]["input_ids"].numpy() for i in range(len(blocks))])
    # only the final remainder of the whole split is dropped (not one per map batch of 1,000 rows)
    assert len(blocks) == len(expected) // 16
    assert stream.tolist() == expected[:len(blocks) * 16]
    assert (stream == tokenizer.eos_token_id).sum() == sum(np.array(expected[:len(stream)]) == tokenizer.eos_token_id)


def test_blocks_have_block_size_and_int64_ids(tokenizer):
    blocks = pack(DOCS, tokenizer, block_size=8)["validation"]
    shapes = {tuple(blocks[i]["input_ids"].shape) for i in range(len(blocks))}
    assert shapes == {(8,)}
    assert str(blocks[0]["input_ids"].dtype) == "torch.int64"
    with pytest.raises(IndexError):
        blocks[len(blocks)]


def test_packing_is_cached_and_split_too_short_is_an_error(tokenizer):
    first = pack(DOCS, tokenizer)["train"].tokens
    again = pack(DOCS, tokenizer)["train"].tokens
    assert first.folder == again.folder  # the same memory-mapped token store, written once
    with pytest.raises(UserError, match="fewer than one block"):
        pack(DOCS, tokenizer, block_size=100_000)


def test_trained_tokenizer_round_trips_text(tokenizer):
    text = "document 12 word word"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"


def test_sampler_is_a_fixed_shuffle_cut_to_whole_steps():
    sampler = MixtureSampler([103], [None], samples_per_step=10, seed=1)
    first = list(sampler)
    assert len(first) == len(sampler) == 100 and len(set(first)) == 100
    assert list(sampler) == first  # same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_sampler_resumes_mid_epoch_without_reading_skipped_samples():
    sampler = MixtureSampler([50], [None], samples_per_step=5, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.start_at(sampler.position(15))
    assert len(sampler) == 35
    assert list(sampler) == full[15:]
    assert list(sampler) == full  # the skip applies to one epoch only
    assert sampler.position(50)["epoch_complete"] and not sampler.position(45)["epoch_complete"]


def test_a_literal_end_of_text_string_in_a_document_is_text(tokenizer):
    """Web and code corpora hold the string "<|endoftext|>": it must not end a document (only the EOS
    appended after each document does), or document masking and the store's document ends split it."""
    docs = [f"doc {i} says {tokenizer.eos_token} in its text" for i in range(40)]
    blocks = pack(docs, tokenizer, block_size=8)
    tokens = np.concatenate([blocks["train"].tokens[:], blocks["validation"].tokens[:]])
    assert (tokens == tokenizer.eos_token_id).sum() == 2 * len(docs)  # one EOS per document, train and validation
    assert tokenizer.eos_token in tokenizer.decode(tokens[:tokens.tolist().index(tokenizer.eos_token_id)])


def test_held_out_text_beyond_what_is_evaluated_is_trained_on_the_same_on_every_path(tokenizer, corpus, tmp_path):
    """Without a validation split, evaluation takes the first blocks of the held-out documents and
    training gets every document after the last one evaluation touched, on disk as with --streaming."""
    from utils.config import parse_args
    from utils.data import document_encoder
    from utils.sources import load_source
    from utils.stream import hold_out_validation, split_stream

    args = parse_args(["--train_file", str(corpus), "--output_dir", str(tmp_path)])
    source = load_source(args.sources[0], validation_split_percentage=50)
    docs = [d["text"] for split in ("validation", "train") for d in source["splits"][split]]
    encoded = document_encoder(tokenizer)(docs)
    every, ends = np.concatenate(encoded), np.cumsum([len(x) for x in encoded])
    for max_eval_samples in (5, None):
        blocks = tokenize_and_pack([source], tokenizer, 16, PartialState(), max_eval_samples=max_eval_samples)[0]
        evaluated = np.concatenate([blocks["validation"][i]["input_ids"].numpy() for i in range(len(blocks["validation"]))])
        trained = blocks["train"].tokens[:]
        if max_eval_samples:  # evaluation reads 5 blocks; the rest of the held-out documents train
            last = int(np.searchsorted(ends, 5 * 16))  # the document holding the last evaluated token
            assert evaluated.tolist() == every[:80].tolist() and blocks["eval_tokens"] == 80
            assert blocks["held_out_tokens"] == ends[last] < ends[len(source["splits"]["validation"]) - 1]
            assert trained.tolist() == every[ends[last]:].tolist()
        else:  # the default budget (1M tokens) is more than the 50% held out: all of it is evaluated
            last = len(source["splits"]["validation"]) - 1
            assert blocks["held_out_tokens"] == ends[last] and len(evaluated) == ends[last] // 16 * 16
            assert trained.tolist() == every[ends[last]:].tolist()
        stream = load_source(args.sources[0], streaming=True)["splits"]  # --streaming holds out the same documents
        validation, held_documents, held_out = hold_out_validation(stream, "text", document_encoder(tokenizer), 16,
                                                                   max_eval_samples, validation_split_percentage=50)
        train = split_stream(stream["train"], 1, held_documents)[0][0]
        assert held_out == blocks["held_out_tokens"] and next(iter(train))["text"] == docs[last + 1]
        assert len(validation) == len(blocks["validation"])
        assert validation.tokens[:len(evaluated)].tolist() == evaluated.tolist()


def test_a_tokenizer_trained_here_learns_from_a_bounded_sample_spread_over_each_source():
    """Training a tokenizer on the whole corpus grows with it (8 MB/s, on each node's main process while
    the other ranks wait): it learns from a fixed number of documents, evenly spread, in equal parts."""
    from utils.data import _spread_sample

    raw = Dataset.from_dict({"text": [f"doc{i}" for i in range(1000)]})
    assert list(_spread_sample(raw, "text", 4)) == ["doc0", "doc250", "doc500", "doc750"]
    assert list(_spread_sample(raw.select(range(3)), "text", 4)) == ["doc0", "doc1", "doc2"]
    long = Dataset.from_dict({"text": ["x" * 10_000, "", "y"]})  # cut to a bounded length; empty ones skipped
    assert [len(t) for t in _spread_sample(long, "text", 10)] == [8_192, 1]
    # each source gets its part: a rare word of the second source is learned from a sample of 2 + 2
    first = Dataset.from_dict({"text": ["common words here " * 20] * 500})
    second = Dataset.from_dict({"text": ["zyxwvzyxwv " * 30] * 500})
    small = load_tokenizer(None, 300, [in_memory_source({"train": first}, "a"), in_memory_source({"train": second}, "b")],
                           PartialState(), sample_documents=4)
    assert len(small("zyxwvzyxwv")["input_ids"]) <= 2
    larger = load_tokenizer(None, 300, [in_memory_source({"train": first}, "a"), in_memory_source({"train": second}, "b")],
                            PartialState(), sample_documents=1000)
    assert larger.name_or_path != small.name_or_path  # the sample is part of the cached tokenizer's identity
    assert len(larger("common words here")["input_ids"]) <= 3  # learned from text, not from anything else
