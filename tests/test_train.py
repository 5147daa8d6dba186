"""End-to-end: real `accelerate launch train.py` runs on a tiny Llama, with 1 and 2 CPU processes."""

import math
import os
import shutil

import pytest
from transformers import pipeline

from conftest import TINY, launch, read_metrics, results, saved_model_eval_loss, train_losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """One uninterrupted run with checkpoints, shared by the tests below."""
    out = tmp_path_factory.mktemp("run") / "out"
    launch(["--train_file", corpus, "--output_dir", out, *TINY, "--max_train_steps", 24, "--eval_steps", 12,
            "--checkpointing_steps", 8, "--checkpoints_total_limit", 2, "--report_to", "tensorboard"])
    return out


def test_training_lowers_loss_and_reports(trained):
    res = results(trained)
    assert res["eval_loss"] < res["initial_eval_loss"] - 0.5
    assert res["perplexity"] == pytest.approx(math.exp(res["eval_loss"]))
    assert res["train_tokens"] == 24 * 4 * 32 and res["tokens_per_second"] > 0 and res["train_seconds"] > 0
    assert (res["num_processes"], res["distributed_type"], res["mixed_precision"]) == (1, "NO", "no")
    records = read_metrics(trained)
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 25))
    assert {"lr", "grad_norm", "tokens_per_second", "peak_memory_gib", "data_wait_pct"} <= set(logged[0])
    evals = [r["step"] for r in records if "eval_loss" in r]
    assert evals == [0, 12, 24]
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert list(trained.glob("**/events.out.tfevents.*"))  # TensorBoard tracker wrote its event file


def test_saved_model_reloads_with_reported_eval_loss(trained, corpus):
    files = set(os.listdir(trained))
    assert {"model.safetensors", "config.json", "tokenizer.json", "results.json", "metrics.jsonl"} <= files
    assert saved_model_eval_loss(trained, corpus) == pytest.approx(results(trained)["eval_loss"], abs=1e-4)
    generator = pipeline("text-generation", model=str(trained))
    text = generator("The", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("The") and len(text) > 3


def test_checkpoint_rotation_keeps_the_newest(trained):
    assert sorted(os.listdir(trained / "checkpoints")) == ["step_16", "step_24"]


def test_resume_mid_epoch_logs_the_same_losses(trained, tmp_path, corpus):
    resumed = tmp_path / "resumed"
    shutil.copytree(trained, resumed)
    result = launch(["--train_file", corpus, "--output_dir", resumed, *TINY, "--max_train_steps", 24,
                     "--eval_steps", 12, "--resume_from_checkpoint", resumed / "checkpoints" / "step_16"])
    assert "resumed from" in result.stdout + result.stderr
    original, again = train_losses(trained), train_losses(resumed)
    assert sorted(again) == list(range(1, 25))  # steps 1-16 kept from before the checkpoint, 17-24 logged again
    assert [again[s] for s in range(17, 25)] == [original[s] for s in range(17, 25)]  # bit for bit on CPU
    assert results(resumed)["eval_loss"] == results(trained)["eval_loss"]


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path, corpus):
    out = tmp_path / "fresh"
    result = launch(["--train_file", corpus, "--output_dir", out, *TINY, "--max_train_steps", 2,
                     "--resume_from_checkpoint", "latest"])
    assert "starting fresh" in result.stdout + result.stderr
    assert results(out)["steps"] == 2


def test_two_processes_train_and_save_a_loadable_model(tmp_path, corpus):
    out = tmp_path / "ddp"
    launch(["--train_file", corpus, "--output_dir", out, *TINY, "--max_train_steps", 6], num_processes=2)
    res = results(out)
    assert (res["num_processes"], res["distributed_type"]) == (2, "MULTI_CPU")  # DDP over gloo
    assert res["global_batch_size"] == 8 and res["train_tokens"] == 6 * 8 * 32
    assert saved_model_eval_loss(out, corpus) == pytest.approx(res["eval_loss"], abs=1e-4)


@pytest.mark.parametrize("flag, tolerance", [("--gradient_checkpointing", 1e-5), ("--torch_compile", 1e-3)])
def test_speed_flags_keep_the_numerics(flag, tolerance, trained, tmp_path, corpus):
    """Recomputed activations give the same losses; inductor's fused kernels differ only in rounding.
    The first steps are warmup, whose lr does not depend on the run length, so they compare directly."""
    out = tmp_path / flag.strip("-")
    launch(["--train_file", corpus, "--output_dir", out, *TINY, "--max_train_steps", 4, flag])
    reference, losses = train_losses(trained), train_losses(out)
    assert max(abs(losses[s] - reference[s]) for s in range(1, 5)) < tolerance
