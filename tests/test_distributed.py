"""The config matrix, proven on CPU with real 2-process launches: DDP and DeepSpeed ZeRO 1/2/3
(with and without offload) train the same steps as one process, save real weights, and resume.

Run alone with `python -m pytest -m distributed`.
"""

import shutil

import pytest

from conftest import ROOT, TINY, launch, results, saved_model_eval_loss, train_losses

pytestmark = pytest.mark.distributed

# fp32 on CPU: the runs differ only in summation order (micro-batch means averaged in another
# order, gradients all-reduced over gloo), about 1e-7 relative per operation. Over 8 AdamW steps
# the largest loss difference seen was under 2e-6; 1e-4 leaves room and still fails for any real
# error (a doubled gradient, a skipped batch or a wrongly stepped schedule moves losses by >1e-2).
LOSS_TOLERANCE = 1e-4
STEPS = ["--max_train_steps", 8, "--num_warmup_steps", 2, "--eval_steps", 8, "--checkpointing_steps", 4]
DEEPSPEED = {"DS_ACCELERATOR": "cpu"}


def ds_file_config(tmp_path, ds_json):
    """An accelerate config that points at one of our ds_configs/*.json files, as a user would."""
    path = tmp_path / f"{ds_json}.yaml"
    path.write_text(f"distributed_type: DEEPSPEED\nnum_machines: 1\nnum_processes: 2\ndeepspeed_config:\n"
                    f"  deepspeed_config_file: {ROOT / 'ds_configs' / ds_json}.json\n  zero3_init_flag: false\n")
    return path


CONFIGS = {  # name: (accelerate config, distributed_type, zero stage)
    "ddp": ("multi_cpu.yaml", "MULTI_CPU", None),
    "zero1": ("deepspeed_zero1.yaml", "DEEPSPEED", 1),
    "zero2": ("deepspeed_zero2.yaml", "DEEPSPEED", 2),
    "zero2_offload": ("zero2_offload", "DEEPSPEED", 2),  # through ds_configs/zero2_offload.json
    "zero3": ("deepspeed_zero3.yaml", "DEEPSPEED", 3),
    "zero3_offload": ("deepspeed_zero3_offload.yaml", "DEEPSPEED", 3),
}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, corpus):
    """One process, micro-batch 8, no accumulation: the reference the others must reproduce."""
    out = tmp_path_factory.mktemp("baseline")
    launch(["--train_file", corpus, "--output_dir", out, *TINY, *STEPS, "--per_device_train_batch_size", 8])
    return train_losses(out)


def assert_same_losses(losses, reference):
    assert sorted(losses) == sorted(reference)
    worst = max(abs(losses[s] - reference[s]) for s in reference)
    print(f"largest per-step loss difference against the 1-process baseline: {worst:.2e}")
    assert worst < LOSS_TOLERANCE, f"largest per-step loss difference {worst:.2e}"


def test_accumulation_matches_one_big_batch(tmp_path, corpus, baseline):
    out = tmp_path / "accumulate"
    launch(["--train_file", corpus, "--output_dir", out, *TINY, *STEPS, "--global_batch_size", 8])
    res = results(out)
    assert (res["num_processes"], res["gradient_accumulation_steps"], res["global_batch_size"]) == (1, 2, 8)
    assert_same_losses(train_losses(out), baseline)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_match_save_and_resume(name, tmp_path, corpus, baseline):
    config, distributed_type, zero_stage = CONFIGS[name]
    if not config.endswith(".yaml"):
        config = ds_file_config(tmp_path, config)
    env = DEEPSPEED if distributed_type == "DEEPSPEED" else None
    # zero.Init draws the initial weights differently; parity needs the same start (tested on its own below)
    same_init = ["--zero3_init_flag", "false"] if zero_stage == 3 else []
    out = tmp_path / "run"
    args = ["--train_file", corpus, "--output_dir", out, *TINY, *STEPS, "--global_batch_size", 8]
    launch(args, num_processes=2, config_file=config, extra_env=env, launch_args=same_init)

    # Parity: 2 processes x micro-batch 4 see the same 8 sequences per step as the baseline.
    res = results(out)
    assert (res["num_processes"], res["distributed_type"], res["zero_stage"]) == (2, distributed_type, zero_stage)
    assert (res["mixed_precision"], res["gradient_accumulation_steps"]) == ("no", 1)
    assert_same_losses(train_losses(out), baseline)

    # Save: the weights gathered under this config reload in a plain process with the same loss.
    assert saved_model_eval_loss(out, corpus) == pytest.approx(res["eval_loss"], abs=1e-5)

    # Resume under the same config from the mid-run checkpoint: steps 5-8 come out the same.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    launch([*args[:3], resumed, *args[4:], "--resume_from_checkpoint", resumed / "checkpoints" / "step_4"],
           num_processes=2, config_file=config, extra_env=env, launch_args=same_init)
    again, original = train_losses(resumed), train_losses(out)
    assert max(abs(again[s] - original[s]) for s in range(5, 9)) < 1e-6
    assert results(resumed)["eval_loss"] == pytest.approx(res["eval_loss"], abs=1e-6)


def test_deepspeed_accumulation_matches_too(tmp_path, corpus, baseline):
    """accelerate hands accumulation to DeepSpeed's engine: 2 processes x 2 micro-batches of 2."""
    out = tmp_path / "zero2_accumulate"
    launch(["--train_file", corpus, "--output_dir", out, *TINY, *STEPS, "--per_device_train_batch_size", 2,
            "--global_batch_size", 8], num_processes=2, config_file="deepspeed_zero2.yaml", extra_env=DEEPSPEED)
    res = results(out)
    assert (res["num_processes"], res["distributed_type"], res["gradient_accumulation_steps"]) == (2, "DEEPSPEED", 2)
    assert_same_losses(train_losses(out), baseline)


def test_zero3_with_zero_init_trains_and_saves_real_weights(tmp_path, corpus):
    """The shipped ZeRO-3 config builds the model already sharded; its saved weights must be real."""
    out = tmp_path / "zero_init"
    launch(["--train_file", corpus, "--output_dir", out, *TINY, *STEPS, "--global_batch_size", 8],
           num_processes=2, config_file="deepspeed_zero3.yaml", extra_env=DEEPSPEED)
    res = results(out)
    assert (res["num_processes"], res["zero_stage"]) == (2, 3)
    assert res["eval_loss"] < res["initial_eval_loss"]
    assert res["parameters"] > 100_000  # counted from DeepSpeed's ds_numel, not the empty partitions
    assert saved_model_eval_loss(out, corpus) == pytest.approx(res["eval_loss"], abs=1e-5)


def test_resume_on_a_different_process_count_continues_the_data(tmp_path, corpus, baseline):
    """A 2-process DDP checkpoint resumed by 1 process with the same global batch: same sequences,
    same steps, so the losses go on as in the 1-process baseline."""
    out = tmp_path / "ddp_then_one"
    args = ["--train_file", corpus, "--output_dir", out, *TINY, *STEPS, "--global_batch_size", 8]
    launch(args, num_processes=2, config_file="multi_cpu.yaml")
    result = launch([*args, "--resume_from_checkpoint", out / "checkpoints" / "step_4"])
    assert "was saved by 2 processes, this run has 1" in result.stdout + result.stderr
    assert results(out)["num_processes"] == 1
    assert_same_losses(train_losses(out), baseline)
