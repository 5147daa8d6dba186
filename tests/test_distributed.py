"""The config matrix, proven on CPU with real multi-process launches of the shipped configs as they
are (zero.Init on): DDP, DeepSpeed ZeRO 1/2/3 with and without offload, and FSDP2 (through the
test-only shim tests/cpu_fsdp.py) train the same steps as one process, save real weights, resume
exactly, and resume on another number of processes.

Run alone with `python -m pytest -m distributed`.
"""

import json
import shutil

import pytest

from conftest import ROOT, TINY, launch, results, saved_model_eval_loss, train_losses

pytestmark = pytest.mark.distributed

# fp32 on CPU: the runs differ only in summation order (micro-batch means averaged in another
# order, gradients all-reduced over gloo or sharded), about 1e-7 relative per operation. Over 8
# AdamW steps the largest loss difference seen was under 2e-6; 1e-4 leaves room and still fails for
# any real error: a doubled gradient, a skipped batch, a wrongly stepped schedule, other initial
# weights, or weight decay 1.0 silently off (that one alone moves step 8 by 1.7e-3).
LOSS_TOLERANCE = 1e-4
STEPS = ["--max_train_steps", 8, "--num_warmup_steps", 2, "--eval_steps", 8, "--checkpointing_steps", 3,
         "--weight_decay", 1.0]

CONFIGS = {  # name: (shipped accelerate config, distributed_type, zero stage)
    "ddp": ("multi_cpu.yaml", "MULTI_CPU", None),
    "zero1": ("deepspeed_zero1.yaml", "DEEPSPEED", 1),
    "zero2": ("deepspeed_zero2.yaml", "DEEPSPEED", 2),
    "zero2_offload": ("deepspeed_zero2_offload.yaml", "DEEPSPEED", 2),
    "zero3": ("deepspeed_zero3.yaml", "DEEPSPEED", 3),
    "zero3_offload": ("deepspeed_zero3_offload.yaml", "DEEPSPEED", 3),
    "fsdp2": ("fsdp.yaml", "FSDP", None),
}


def train_args(corpus, out):
    return ["--train_file", corpus, "--output_dir", out, *TINY, *STEPS, "--global_batch_size", 8]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, corpus):
    """One plain process, micro-batch 8, no accumulation: the reference the others must reproduce."""
    out = tmp_path_factory.mktemp("baseline")
    launch([*train_args(corpus, out), "--per_device_train_batch_size", 8])
    return train_losses(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """Uninterrupted runs, one per (config, process count), made on first use and shared."""
    made = {}

    def run(name, num_processes=2):
        if (name, num_processes) not in made:
            out = tmp_path_factory.mktemp(f"{name}_{num_processes}") / "run"
            # DDP on 2: an empty cache, so both processes tokenize (a shard each) into the store they train on
            fresh = {"HF_HOME": str(out.parent / "hf")} if (name, num_processes) == ("ddp", 2) else None
            launch(train_args(corpus, out), num_processes=num_processes, config_file=CONFIGS[name][0], extra_env=fresh)
            made[name, num_processes] = out
        return made[name, num_processes]
    return run


def assert_same_losses(losses, reference, steps=None):
    steps = steps or sorted(reference)
    assert set(steps) <= set(losses)
    worst = max(abs(losses[s] - reference[s]) for s in steps)
    print(f"largest per-step loss difference: {worst:.2e}")
    assert worst < LOSS_TOLERANCE, f"largest per-step loss difference {worst:.2e}"


def assert_ran_as(out, num_processes, name):
    res = results(out)
    _, distributed_type, zero_stage = CONFIGS[name]
    if num_processes == 1 and name == "ddp":
        distributed_type = "NO"
    assert (res["num_processes"], res["distributed_type"], res["zero_stage"]) == (num_processes, distributed_type,
                                                                                 zero_stage)
    assert res["mixed_precision"] == "no"
    assert res["global_batch_size"] == 8 and res["gradient_accumulation_steps"] == 2 // num_processes
    assert res["config"]["weight_decay"] == 1.0


def test_accumulation_matches_one_big_batch(tmp_path, corpus, baseline):
    out = tmp_path / "accumulate"
    launch(train_args(corpus, out))
    res = results(out)
    assert (res["num_processes"], res["gradient_accumulation_steps"], res["global_batch_size"]) == (1, 2, 8)
    assert_same_losses(train_losses(out), baseline)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_match_save_and_resume(name, tmp_path, corpus, baseline, runs):
    out = runs(name)
    # Parity: 2 processes x micro-batch 4 see the same 8 sequences per step as the baseline, from the
    # same initial weights (zero.Init and FSDP2 included) and with the same weight decay.
    assert_ran_as(out, 2, name)
    assert_same_losses(train_losses(out), baseline)
    assert results(out)["init_on_meta"] is (name == "fsdp2")  # FSDP2: built empty, each process fills its shards

    # Save: each process wrote whole tensors of about half the model (none gathered it all), and the
    # files reload in a plain process with the same loss.
    res = results(out)
    shards = sorted(out.glob("model-*-of-00002.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) == 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    sizes = [p.stat().st_size for p in shards]
    assert min(sizes) > 0.3 * sum(sizes), sizes
    assert saved_model_eval_loss(out, corpus) == pytest.approx(res["eval_loss"], abs=1e-5)

    # Resume under the same config from the checkpoint at step 3: steps 4-8 come out the same.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    launch([*train_args(corpus, resumed), "--resume_from_checkpoint", resumed / "checkpoints" / "step_3"],
           num_processes=2, config_file=CONFIGS[name][0])
    again, original = train_losses(resumed), train_losses(out)
    assert max(abs(again[s] - original[s]) for s in range(4, 9)) < 1e-6
    assert results(resumed)["eval_loss"] == pytest.approx(res["eval_loss"], abs=1e-6)


def test_fsdp2_from_the_meta_device_trains_tied_gpt2_as_one_process(tmp_path, corpus):
    """GPT-2's tied embeddings under accelerate's own FSDP2 units (the embedding, the tail, each block):
    built empty, each process fills its shards, and it trains as one process with the same parameter
    count (uneven shards: tests/test_init.py::test_fsdp2_from_the_meta_device_gives_the_same_weights)."""
    def args(out, micro):
        return [*train_args(corpus, out), "--model_preset", "gpt2-tiny", "--per_device_train_batch_size", micro]
    one, two = tmp_path / "one", tmp_path / "two"
    launch(args(one, 8))
    launch(args(two, 4), num_processes=2, config_file="fsdp.yaml")
    assert_ran_as(two, 2, "fsdp2")
    assert results(two)["init_on_meta"] and results(two)["parameters"] == results(one)["parameters"]
    assert_same_losses(train_losses(two), train_losses(one))


def test_deepspeed_accumulation_matches_too(tmp_path, corpus, baseline):
    """accelerate hands accumulation to DeepSpeed's engine: 2 processes x 2 micro-batches of 2."""
    out = tmp_path / "zero2_accumulate"
    launch([*train_args(corpus, out), "--per_device_train_batch_size", 2], num_processes=2,
           config_file="deepspeed_zero2.yaml")
    res = results(out)
    assert (res["num_processes"], res["distributed_type"], res["gradient_accumulation_steps"]) == (2, "DEEPSPEED", 2)
    assert_same_losses(train_losses(out), baseline)


@pytest.mark.parametrize("saved_by, resumed_by", [(2, 1), (1, 2)])
@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3", "fsdp2"])
def test_resume_on_another_process_count(name, saved_by, resumed_by, tmp_path, corpus, baseline, runs):
    """Checkpoint at step 3 (odd: with 2 -> 1 the accumulation count changes from 1 to 2, and
    accelerate's restored micro-batch counter would put the sync boundary mid-step), resume on the
    other process count with --global_batch_size fixed: the same losses as the uninterrupted run.
    DeepSpeed goes through its universal checkpoint, FSDP2 through DCP resharding."""
    original = runs(name, saved_by)
    out = tmp_path / "resumed"
    shutil.copytree(original, out)
    result = launch([*train_args(corpus, out), "--resume_from_checkpoint", out / "checkpoints" / "step_3"],
                    num_processes=resumed_by, config_file=CONFIGS[name][0])
    assert f"was saved by {saved_by} processes, this run has {resumed_by}" in result.stdout + result.stderr
    assert_ran_as(out, resumed_by, name)
    assert_same_losses(train_losses(out), train_losses(original), steps=range(4, 9))
    assert_same_losses(train_losses(out), baseline)
    if CONFIGS[name][1] == "DEEPSPEED":
        assert (out / "checkpoints" / "step_3" / "universal").is_dir()
    # and it saves again in its own layout: resuming that checkpoint on the same count continues exactly
    again = tmp_path / "again"
    shutil.copytree(out, again)
    launch([*train_args(corpus, again), "--resume_from_checkpoint", again / "checkpoints" / "step_6"],
           num_processes=resumed_by, config_file=CONFIGS[name][0])
    assert_same_losses(train_losses(again), train_losses(out), steps=range(7, 9))


def test_a_conversion_longer_than_the_process_group_timeout_still_resumes(tmp_path, corpus, runs):
    """The main process converts a 1-process ZeRO-2 checkpoint for 2 processes while the other waits on
    the filesystem, not in a collective: a conversion slower than --ddp_timeout (a 70B checkpoint takes
    hours) no longer kills the waiting rank and, with it, the converter."""
    import subprocess

    from conftest import launch_command

    out = tmp_path / "resumed"
    shutil.copytree(runs("zero2", 1), out)
    cmd, env = launch_command([*train_args(corpus, out), "--resume_from_checkpoint", out / "checkpoints" / "step_3",
                               "--ddp_timeout", 10], num_processes=2, config_file=CONFIGS["zero2"][0])
    train = cmd.index(str(ROOT / "train.py"))
    cmd[train:train] = [str(ROOT / "tests" / "slow_conversion.py"), "25"]  # 25 s > the 10 s timeout
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "converting" in done.stdout and (out / "checkpoints" / "step_3" / "universal").is_dir()
    assert_same_losses(train_losses(out), train_losses(runs("zero2", 1)), steps=range(4, 9))


def test_convert_checkpoint_ahead_of_the_job(tmp_path, corpus, runs):
    """convert_checkpoint.py writes STEP/universal before the launch; the resume on another count loads it
    without converting."""
    import subprocess
    import sys

    out = tmp_path / "ahead"
    shutil.copytree(runs("zero2", 2), out)
    step = out / "checkpoints" / "step_3"
    done = subprocess.run([sys.executable, str(ROOT / "convert_checkpoint.py"), str(step), "--workers", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "converted in" in done.stdout and (step / "universal").is_dir(), done.stderr[-3000:]
    result = launch([*train_args(corpus, out), "--resume_from_checkpoint", step], num_processes=1,
                    config_file=CONFIGS["zero2"][0])
    assert "converting" not in result.stdout
    assert_same_losses(train_losses(out), train_losses(runs("zero2", 2)), steps=range(4, 9))
