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
    assert first.filename == again.filename  # the same memory-mapped token file, written once
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
