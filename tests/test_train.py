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


def test_set_up_and_the_first_evaluation_are_not_training_time(tmp_path, corpus):
    """A large validation split makes the step-0 evaluation far longer than a step: none of it may show
    up as training time or data wait (it once made step 1 read ~80% data wait)."""
    out = tmp_path / "big_eval"
    launch(["--train_file", corpus, "--output_dir", out, *TINY, "--max_train_steps", 3, "--eval_steps", 100,
            "--validation_split_percentage", 60])
    first = [r for r in read_metrics(out) if "loss" in r][0]
    assert first["step"] == 1 and first["data_wait_pct"] < 50, first
    assert first["predicted_tokens"] == 4 * 31  # no document masking: every label but the first of each block


def test_the_clock_counts_training_steps_and_data_wait_counts_only_the_loader(monkeypatch, tmp_path):
    """TrainingMetrics with a fake clock: time before start() and inside paused() is not training time;
    data wait is the time inside the loader's next(), not a logging step's synchronizations."""
    import torch

    import utils.metrics as metrics_module

    now = [0.0]
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: now[0])

    class Accelerator:
        device, num_processes, is_main_process = torch.device("cpu"), 1, True
        reduce = staticmethod(lambda tensor, op: tensor)
        gather = staticmethod(lambda tensor: tensor)
        log = staticmethod(lambda values, step: logged.append(values))

    logged = []
    metrics = metrics_module.TrainingMetrics(Accelerator(), str(tmp_path), 2, 100, 1.0, None)
    monkeypatch.setattr(metrics.log, "log", lambda step, **values: logged.append(values))
    now[0] += 50.0  # trackers and the first evaluation
    metrics.start()

    def loader():
        for _ in range(4):
            now[0] += 0.25  # the loader's own time
            yield {"labels": torch.zeros(1, 2)}

    for step, (batch,) in enumerate(metrics.steps(loader(), 1), 1):
        now[0] += 0.75  # forward, backward, optimizer
        metrics.micro_batch_done(torch.tensor(2.0))
        if step == 2:
            with metrics.paused():
                now[0] += 30.0  # an evaluation
        metrics.step_done(step, 4, lr=0.1, grad_norm=1.0, predicted_tokens=torch.tensor(7))
        now[0] += 0.5 if step % 2 == 0 else 0.0  # a logging step's host syncs: not data wait
    assert [round(r["tokens_per_second"], 6) for r in logged] == [200 / 2.0, 200 / 2.5]
    assert [round(r["data_wait_pct"], 6) for r in logged] == [25.0, 20.0]
    assert logged[0]["loss"] == 2.0 and logged[0]["predicted_tokens"] == 7
    assert metrics.summary()["train_seconds"] == pytest.approx(4.5)
