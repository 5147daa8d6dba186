"""prepare_data.py writes a token store; train.py --data_dir trains on exactly the blocks it would
have made from the same flags itself; interrupted stores resume, bad ones are refused early."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, TINY, launch, train_losses
from utils.store import ShardedTokens, shard_number, token_dtype


def script(name, *flags):
    return subprocess.run([sys.executable, str(ROOT / name), *map(str, flags)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def prepare(*flags):
    return script("prepare_data.py", *flags)


def train(*flags):  # errors: python train.py shows train.py's own exit code (accelerate launch turns it into 1)
    return script("train.py", *flags)


@pytest.fixture(scope="module")
def store(tmp_path_factory, corpus):
    path = tmp_path_factory.mktemp("store") / "store"
    result = prepare("--train_file", corpus, "--vocab_size", 512, "--data_dir", path, "--shard_documents", 16)
    assert result.returncode == 0, result.stderr[-3000:]
    return path


def test_store_layout_counts_and_boundaries(store, corpus):
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and (store / "tokenizer" / "tokenizer.json").is_file()
    source = manifest["sources"][0]
    assert source["identity"]["path"] == str(corpus) and source["identity"]["bytes"] == os.path.getsize(corpus)
    train = source["splits"]["train"]
    assert train["shards"] > 1  # 16 documents per shard
    folder = store / source["dir"] / "train"
    index = np.load(folder / "index.npy")
    assert index.shape == (train["shards"], 3) and index[:, 1].sum() == train["documents"]
    assert index[:, 2].tolist() == np.cumsum(index[:, 0]).tolist()
    tokens = np.concatenate([np.fromfile(folder / f"shard-{k:05d}.bin", dtype=np.uint16) for k in range(len(index))])
    assert len(tokens) == train["tokens"] == index[:, 0].sum()
    ends = np.load(folder / "shard-00000.ends.npy")
    assert (tokens[ends - 1] == manifest["eos_token_id"]).all()  # every document ends with EOS


def test_training_from_a_store_matches_tokenizing_in_the_job(store, corpus, tmp_path):
    common = [*TINY, "--max_train_steps", 4, "--eval_steps", 4]
    launch(["--train_file", corpus, "--output_dir", tmp_path / "in_job", *common])
    launch(["--data_dir", store, "--output_dir", tmp_path / "store", *common])
    launch(["--data_dir", store, "--output_dir", tmp_path / "store2", *common, "--per_device_train_batch_size", 2],
           num_processes=2)
    in_job, from_store = train_losses(tmp_path / "in_job"), train_losses(tmp_path / "store")
    assert from_store == in_job  # the same blocks in the same order: bit-identical losses
    two = train_losses(tmp_path / "store2")
    assert two == pytest.approx(in_job, abs=1e-5)
    results = json.loads((tmp_path / "store2" / "results.json").read_text())
    assert results["num_processes"] == 2


def test_an_interrupted_store_keeps_its_finished_shards(store, corpus, tmp_path):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(store), str(copy)], check=True)
    manifest = json.loads((copy / "manifest.json").read_text())
    folder = copy / manifest["sources"][0]["dir"] / "train"
    (copy / "manifest.json").unlink()  # killed before the end: the last shard is not finished
    (folder / "shard-00001.json").unlink()
    (folder / "shard-00001.bin").unlink()
    kept = (folder / "shard-00000.bin").stat().st_mtime_ns
    result = train("--data_dir", copy, "--output_dir", tmp_path / "out", *TINY)
    assert result.returncode == 2 and "is incomplete" in result.stderr.strip().splitlines()[-1]
    again = prepare("--train_file", corpus, "--vocab_size", 512, "--data_dir", copy, "--shard_documents", 16)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (folder / "shard-00000.bin").stat().st_mtime_ns == kept  # not written again
    assert json.loads((copy / "manifest.json").read_text())["content_id"] == manifest["content_id"]


def test_bad_stores_and_flags_are_one_clear_line(store, corpus, tmp_path):
    def error(result):
        assert result.returncode == 2, result.stderr[-2000:]
        return result.stderr.strip().splitlines()[-1]

    assert "not a token store" in error(train("--data_dir", tmp_path, "--output_dir", tmp_path / "o"))
    assert "drop --train_file" in error(train("--data_dir", store, "--train_file", corpus))
    other = prepare("--train_file", corpus, "--vocab_size", 300, "--data_dir", store, "--shard_documents", 16)
    assert "store of other sources or another tokenizer" in error(other)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert "not empty" in error(prepare("--train_file", corpus, "--data_dir", tmp_path / "busy"))
    tokenizer_dir = tmp_path / "tok"
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(store / "tokenizer").save_pretrained(tokenizer_dir)
    json_path = tokenizer_dir / "tokenizer.json"
    spec = json.loads(json_path.read_text())
    spec["model"]["vocab"]["zzzz"] = len(spec["model"]["vocab"]) + 10  # another vocabulary
    json_path.write_text(json.dumps(spec))
    mismatch = train("--data_dir", store, "--tokenizer_name", tokenizer_dir, "--output_dir", tmp_path / "o", *TINY)
    assert "tokenized with another tokenizer" in error(mismatch)
    # weights are chosen when training: checked against the store's sources, never written into it
    from prepare_data import main as prepare_main
    from utils.config import parse_args
    from utils.errors import UserError

    with pytest.raises(UserError, match="at least one positive"):
        parse_args(["--data_dir", str(store), "--train_weights", "0", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(UserError, match="pass --train_weights to train.py"):
        prepare_main(["--train_file", str(corpus), "--train_weights", "2", "--data_dir", str(tmp_path / "new")])


def test_token_width_and_sharded_reads():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32  # Llama-3's 128k vocabulary: 32 bits
    parts = [np.arange(0, 5), np.arange(5, 5), np.arange(5, 12), np.arange(12, 20)]
    joined = ShardedTokens(parts)
    assert len(joined) == 20
    for a, b in [(0, 20), (3, 9), (5, 12), (11, 13), (19, 20), (7, 7)]:
        assert joined[a:b].tolist() == list(range(a, b))


def test_shards_are_listed_in_their_order_past_100000():
    """Shard names carry five digits: by name, a split's 100,001st shard (about 5e9 documents, a 10T-token
    source) would be listed before its 100,000th, and the manifest would join the documents out of order."""
    names = ["shard-100000.json", "shard-99999.json", "shard-00002.json", "shard-100001.json"]
    assert sorted(names, key=shard_number) == ["shard-00002.json", "shard-99999.json", "shard-100000.json",
                                               "shard-100001.json"]


def test_a_damaged_store_is_refused_in_one_line_and_verify_checks_every_byte(store, tmp_path):
    """An interrupted copy to a shared filesystem leaves shards cut short: refused when the store is
    opened (a size check per shard), before any work; --verify compares every shard with its sha256."""
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(store), str(copy)], check=True)
    ok = prepare("--data_dir", copy, "--verify")
    assert ok.returncode == 0 and "verified" in ok.stdout, ok.stderr[-2000:]
    manifest = json.loads((copy / "manifest.json").read_text())
    shard = copy / manifest["sources"][0]["dir"] / "train" / "shard-00001.bin"
    data = shard.read_bytes()
    for cut in (data[:1000], data[:-2]):  # much shorter (the old diagnosis: "fewer than one step"), one token short
        shard.write_bytes(cut)
        result = train("--data_dir", copy, "--output_dir", tmp_path / "out", *TINY)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "is damaged" in result.stderr.strip().splitlines()[-1] and "shard-00001.bin" in result.stderr
        assert not (tmp_path / "out").exists()
    flipped = bytearray(data)
    flipped[10] ^= 0xFF  # the same size, other bytes: only the digests see it
    shard.write_bytes(bytes(flipped))
    bad = prepare("--data_dir", copy, "--verify")
    assert bad.returncode == 2 and "does not match its sha256" in bad.stderr.strip().splitlines()[-1]


def test_thousands_of_shards_stay_within_the_open_file_limit(tmp_path):
    """A memory-mapped file holds a file descriptor: a store of more shards than `ulimit -n` (a 1T-token
    store has ~30,000) must still train. 400 shards are read here under a limit of 96 open files."""
    corpus = tmp_path / "many.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document number {i} has a few words in it"}) + "\n"
                              for i in range(400)))
    store = tmp_path / "store"
    done = prepare("--train_file", corpus, "--vocab_size", 300, "--data_dir", store, "--shard_documents", 1)
    assert done.returncode == 0, done.stderr[-2000:]
    code = ("import os, resource, sys; sys.path.insert(0, sys.argv[1]); from utils.data import open_blocks; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96)); blocks = open_blocks(sys.argv[2], 8)[0]; "
            "train = blocks['train']; seen = [train[i]['input_ids'] for i in reversed(range(len(train)))]; "
            "print(len(seen), len(os.listdir('/proc/self/fd')))")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT), str(store)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    blocks, open_files = map(int, result.stdout.split())
    assert blocks > 300 // 8 and open_files < 96


def test_a_nodes_processes_share_the_shards_and_wait_on_the_filesystem(tmp_path):
    """In-job tokenizing: each process of a node writes every n-th shard; the first waits for the others'
    (on the filesystem, not in a timed collective) and writes the manifest: the same store one writer makes."""
    import threading

    from accelerate import PartialState
    from datasets import Dataset

    from utils.data import document_encoder, load_tokenizer
    from utils.sources import in_memory_source
    from utils.store import write_store

    splits = {"train": Dataset.from_dict({"text": [f"document {i} with words" for i in range(70)]}),
              "validation": Dataset.from_dict({"text": [f"held {i}" for i in range(9)]})}
    sources = [in_memory_source(splits)]
    tokenizer = load_tokenizer(None, 300, sources, PartialState())
    encode = document_encoder(tokenizer)
    alone = write_store(tmp_path / "alone", sources, tokenizer, encode, shard_documents=10)
    together, first = tmp_path / "together", {}
    waiting = threading.Thread(target=lambda: first.update(
        manifest=write_store(together, sources, tokenizer, encode, shard_documents=10, part=(0, 3))))
    waiting.start()
    for _ in range(600):  # its part: ordinals 0, 3, 6 of 7 train + 1 validation shards
        if len(list(together.rglob("shard-*.json"))) == 3:
            break
        waiting.join(timeout=0.1)
    waiting.join(timeout=2)
    assert len(list(together.rglob("shard-*.json"))) == 3  # nothing more: the other parts are the others'
    assert waiting.is_alive() and not (together / "manifest.json").exists()  # waiting for them
    assert write_store(together, sources, tokenizer, encode, shard_documents=10, part=(2, 3)) is None
    assert write_store(together, sources, tokenizer, encode, shard_documents=10, part=(1, 3)) is None
    waiting.join(timeout=30)
    assert not waiting.is_alive() and first["manifest"]["content_id"] == alone["content_id"]


def test_a_format_2_store_still_trains_the_same(store, tmp_path):
    """Format 3 moved each split's shard list out of the manifest (index.npy): a store written before it
    (its shards listed in manifest.json) opens as the same blocks, with the same content ids."""
    from utils.data import open_blocks

    old = tmp_path / "old"
    subprocess.run(["cp", "-r", str(store), str(old)], check=True)
    manifest = json.loads((old / "manifest.json").read_text())
    for source in manifest["sources"]:
        del source["content"]
        for split, recorded in source["splits"].items():
            folder = old / source["dir"] / split
            recorded["shards"] = [{**json.loads((folder / f"shard-{k:05d}.json").read_text()), "name": f"shard-{k:05d}"}
                                  for k in range(recorded["shards"])]
            (folder / "index.npy").unlink()
    (old / "manifest.json").write_text(json.dumps({**manifest, "format": 2}))
    new, before = open_blocks(store, 8, 4), open_blocks(old, 8, 4)
    for a, b in zip(new, before):
        assert a["content"] == b["content"] and a["held_out_tokens"] == b["held_out_tokens"]
        for split in ("train", "validation"):
            assert len(a[split]) == len(b[split]) > 0
            assert all(a[split][i]["input_ids"].tolist() == b[split][i]["input_ids"].tolist() for i in range(len(a[split])))
    assert prepare("--data_dir", old, "--verify").returncode == 0


def test_a_shard_cut_short_after_opening_is_refused_when_read(store, tmp_path):
    """Only the main process stats every shard when a store is opened; every process checks a shard's
    size again when it maps it, so a short shard is refused in one line, never read short."""
    from utils.data import open_blocks
    from utils.errors import UserError

    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(store), str(copy)], check=True)
    manifest = json.loads((copy / "manifest.json").read_text())
    shard = copy / manifest["sources"][0]["dir"] / "train" / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match="is damaged: .*shard-00000.bin has"):
        open_blocks(copy, 8, 4)
    train = open_blocks(copy, 8, 4, check=False)[0]["train"]
    with pytest.raises(UserError, match="shard-00000.bin has .* bytes where its index records"):
        [train[i] for i in range(len(train))]


def test_a_shard_of_empty_documents_reads_as_nothing(tmp_path):
    """Blank rows are documents without tokens: a shard of only those is an empty file, which cannot be
    memory-mapped; reading across it must give the tokens around it."""
    from accelerate import PartialState
    from datasets import Dataset

    from utils.data import document_encoder, load_tokenizer, open_blocks
    from utils.sources import in_memory_source
    from utils.store import write_store

    texts = [f"document {i} " + "word " * (i % 3) for i in range(10)]
    texts[4:6] = ["", ""]  # shard 2 of 5 (2 documents each): no tokens
    sources = [in_memory_source({"train": Dataset.from_dict({"text": texts}),
                                 "validation": Dataset.from_dict({"text": ["held out text"] * 4})})]
    tokenizer = load_tokenizer(None, 300, sources, PartialState())
    manifest = write_store(tmp_path / "store", sources, tokenizer, document_encoder(tokenizer), shard_documents=2)
    folder = tmp_path / "store" / manifest["sources"][0]["dir"] / "train"
    assert (folder / "shard-00002.bin").stat().st_size == 0
    index = np.load(folder / "index.npy")
    assert index[:2, 0].sum() % 3  # a block of 3 tokens runs across the empty shard
    train = open_blocks(tmp_path / "store", 3, 1)[0]["train"]
    tokens = np.concatenate([train[i]["input_ids"].numpy() for i in range(len(train))])
    expected = np.concatenate([np.fromfile(folder / f"shard-{k:05d}.bin", dtype=np.uint16) for k in range(5)])
    assert len(train) == len(expected) // 3 and (tokens == expected[:len(tokens)]).all()
