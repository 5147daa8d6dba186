"""--document_masking: inside a packed block every document is computed as if it ran alone."""

import contextlib
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from train import evaluate
from utils.data import IGNORE_INDEX, Collate

EOS = 1
LLAMA = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64, max_position_embeddings=128, bos_token_id=EOS, eos_token_id=EOS)
GPT2 = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0, bos_token_id=EOS, eos_token_id=EOS)


def documents(seed, lengths):
    """Documents of random tokens (never EOS), each ending with EOS as packing joins them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.randint(2, 97, (n - 1,), generator=g), torch.tensor([EOS])]) for n in lengths]


def blocks_and_pieces():
    """Two packed blocks of 24 tokens and, for each, the document pieces it holds: a block starts and ends
    mid-document, and each piece runs alone as its own sequence."""
    stream = torch.cat(documents(0, [5, 9, 3, 12, 1, 7, 11]))  # 48 tokens; a one-token document (a lone EOS) too
    blocks = stream[:48].view(2, 24)
    pieces = []
    for block in blocks:
        ends = (block == EOS).nonzero().flatten().tolist()
        bounds = [0, *[e + 1 for e in ends if e + 1 < len(block)], len(block)]
        pieces.append([block[a:b] for a, b in zip(bounds, bounds[1:])])
    return blocks, pieces


def test_positions_restart_and_first_tokens_are_not_predicted():
    block = torch.tensor([5, 6, EOS, 7, 8, 9, EOS, EOS, 4])
    batch = Collate(document_masking_eos=EOS)([{"input_ids": block}])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, EOS, IGNORE_INDEX, 8, 9, EOS, IGNORE_INDEX, IGNORE_INDEX]]
    plain = Collate()([{"input_ids": block}])
    assert set(plain) == {"input_ids", "labels"} and torch.equal(plain["labels"], plain["input_ids"])


@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_masked_block_loss_equals_its_documents_run_one_by_one(config, attention):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention).train()  # no dropout: as eval
    blocks, pieces = blocks_and_pieces()
    batch = Collate(document_masking_eos=EOS)([{"input_ids": b} for b in blocks])
    predicted = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
    packed_sum = model(**batch, use_cache=False).loss.double() * predicted  # training: the model's own loss

    alone_sum, alone_count = 0.0, 0
    for piece in (p for block_pieces in pieces for p in block_pieces):
        if len(piece) > 1:  # a one-token piece predicts nothing
            ids = piece.unsqueeze(0)
            alone_sum += model(input_ids=ids, labels=ids).loss.double() * (len(piece) - 1)
            alone_count += len(piece) - 1
    assert predicted == alone_count
    assert packed_sum.item() == pytest.approx(alone_sum.item(), rel=1e-5)

    unmasked = Collate()([{"input_ids": b} for b in blocks])
    assert model(**unmasked).loss.item() != pytest.approx(packed_sum.item() / predicted, rel=1e-3)  # it matters

    class Accelerator:  # evaluation's only uses of it: mixed precision (none here), gathering across processes
        gather = staticmethod(lambda x: x)
        autocast = staticmethod(contextlib.nullcontext)

    loader = [Collate(document_masking_eos=EOS)([{"input_ids": b, "source": 0, "block": i}]) for i, b in enumerate(blocks)]
    loss, by_source = evaluate(model, loader, Accelerator(), ["data"])
    assert loss == pytest.approx(alone_sum.item() / alone_count, rel=1e-5) and by_source == {}


def test_training_with_document_masking_in_job_and_streamed(tmp_path, corpus):
    """Real launches: the same seed gives the same initial weights, so the initial eval loss moves only
    because of the mask; a stream is masked the same way (its EOS ids come from the same packing)."""
    from conftest import ROOT, TINY, launch, train_losses

    def run(name, *flags):
        data = [] if "--data_dir" in flags else ["--train_file", corpus]
        launch([*data, "--output_dir", tmp_path / name, *TINY, "--max_train_steps", "3", "--eval_steps", "3", *flags])
        return json.loads((tmp_path / name / "results.json").read_text())

    plain, masked = run("plain"), run("masked", "--document_masking")
    assert masked["config"]["document_masking"] and not plain["config"]["document_masking"]
    # an untrained model barely uses context, but far more than float noise (1e-7) apart
    assert masked["initial_eval_loss"] != pytest.approx(plain["initial_eval_loss"], abs=1e-6)
    assert masked["initial_eval_loss"] == pytest.approx(plain["initial_eval_loss"], abs=0.2)  # the same model
    assert masked["eval_loss"] < masked["initial_eval_loss"]
    streamed = run("streamed", "--document_masking", "--streaming")
    assert streamed["eval_loss"] < streamed["initial_eval_loss"]
    store = tmp_path / "store"  # a prepared token store: the same blocks, masked the same way
    subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--train_file", str(corpus), "--vocab_size", "512",
                    "--data_dir", str(store)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    from_store = run("from_store", "--document_masking", "--data_dir", store)
    assert train_losses(tmp_path / "from_store") == train_losses(tmp_path / "masked")
    assert from_store["eval_loss"] == masked["eval_loss"]


def reference_flash(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Flash attention's semantics in plain torch: with cu_seq_lens, causal attention within each segment
    of the flattened batch (its varlen kernel); without, each row is one causal sequence (position ids at
    a batch size above 1 are not read, as in transformers' flash path)."""
    import torch.nn.functional as F

    batch, heads, length, dim = query.shape
    key, value = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (key, value))
    q, k, v = (x.transpose(1, 2).reshape(batch * length, heads, dim) for x in (query, key, value))
    cu = kwargs.get("cu_seq_lens_q")
    bounds = zip(cu[:-1].tolist(), cu[1:].tolist()) if cu is not None else [(r * length, (r + 1) * length)
                                                                           for r in range(batch)]
    out = torch.empty_like(q)
    for a, b in bounds:
        out[a:b] = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                                  v[a:b].transpose(0, 1), is_causal=True, scale=scaling).transpose(0, 1)
    return out.view(batch, length, heads, dim), None


@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_masking_is_exact_under_flash_attention_at_any_batch_size(config):
    """Flash attention reads packed position ids only at batch size 1; build_model hands it the documents'
    bounds (cu_seq_lens) for larger micro-batches. Checked with flash's semantics written in torch (no
    flash kernels on CPU), registered as a user's own kernel would be."""
    from transformers import AttentionInterface

    from utils.model import build_model

    AttentionInterface.register("varlen_reference", reference_flash)
    blocks, pieces = blocks_and_pieces()
    batch = Collate(document_masking_eos=EOS)([{"input_ids": b} for b in blocks])
    predicted = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
    reference = build_model(config, seed=0, attention="sdpa")  # sdpa: exact at any batch size (tested above)
    expected = reference(**batch, use_cache=False).loss.item()
    flash = build_model(config, seed=0, attention="varlen_reference")
    assert flash(**batch, use_cache=False).loss.item() == pytest.approx(expected, rel=1e-5)
    flash._forward_pre_hooks.clear()  # without the bounds: documents attend to each other, silently
    assert flash(**batch, use_cache=False).loss.item() != pytest.approx(expected, rel=1e-4)
    assert predicted == sum(len(p) - 1 for block_pieces in pieces for p in block_pieces if len(p) > 1)


def test_the_update_does_not_depend_on_how_the_batch_is_split(tmp_path):
    """With document masking the blocks predict different numbers of tokens (a document's first token is
    not predicted). The step's loss is the mean over every predicted token of the step, so 8 x 1 and
    2 x 4 (micro-batch x accumulation) are the same optimization: the same losses, step by step."""
    from conftest import TINY, launch, read_metrics, train_losses

    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
    docs = []
    for run in range(40):  # runs of one-word documents (half their labels masked) and long ones (almost none)
        docs += [words[run % len(words)]] * 30 if run % 2 else [" ".join(words * 6)] * 3
    corpus = tmp_path / "uneven.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    common = ["--train_file", corpus, *TINY, "--document_masking", "--max_train_steps", 6, "--eval_steps", 6,
              "--learning_rate", 1e-2]
    launch([*common, "--output_dir", tmp_path / "whole", "--per_device_train_batch_size", 8])
    launch([*common, "--output_dir", tmp_path / "split", "--per_device_train_batch_size", 2, "--global_batch_size", 8])
    whole, split = train_losses(tmp_path / "whole"), train_losses(tmp_path / "split")
    assert max(abs(whole[s] - split[s]) for s in whole) < 2e-6, (whole, split)
    counts = [[r["predicted_tokens"] for r in read_metrics(tmp_path / run) if "predicted_tokens" in r]
              for run in ("whole", "split")]
    assert counts[0] == counts[1] and len(set(counts[0])) > 1 and max(counts[0]) < 8 * 31  # masked labels vary
