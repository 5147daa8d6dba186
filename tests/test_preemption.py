"""Preemption across ranks, as launchers deliver it: SIGTERM to every process of a 2-process run
(SLURM's --signal reaches each process of the step, and torchrun's agent forwards its own SIGTERM to
the workers again) must end in a complete checkpoint; SIGKILL of the whole group at random moments
must lose nothing but the steps since the last checkpoint. In both cases `--resume_from_checkpoint
latest` ends with the weights of an uninterrupted run.

Run alone with `python -m pytest -m distributed`.
"""

import json
import random
import subprocess
import time

import psutil
import pytest

from conftest import ROOT, TINY, launch, launch_command, saved_weights, train_losses

pytestmark = pytest.mark.distributed
CONFIGS = {"ddp": "multi_cpu.yaml", "zero2": "deepspeed_zero2.yaml"}
DISTRIBUTED_TYPE = {"ddp": "MULTI_CPU", "zero2": "DEEPSPEED"}
RUN = [*TINY, "--max_train_steps", 40, "--checkpointing_steps", 10, "--checkpoints_total_limit", 2,
       "--eval_steps", 1000, "--num_warmup_steps", 3, "--global_batch_size", 8, "--weight_decay", 0.1]


def args_for(corpus, out):
    return ["--train_file", corpus, "--output_dir", out, *RUN, "--resume_from_checkpoint", "latest"]


def start(corpus, out, config, log):
    cmd, env = launch_command(args_for(corpus, out), num_processes=2, config_file=config)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def every_process(process):
    """The launcher and everything it started (torchrun's workers run in sessions of their own); none
    when the run already ended (a fast run can finish before the random moment comes)."""
    try:
        root = psutil.Process(process.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def logged_step(out):
    try:
        return max(train_losses(out), default=0)
    except (OSError, ValueError):
        return 0


def wait_for_step(out, process, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if logged_step(out) >= step:
            return True
        time.sleep(0.01)
    return False


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus):
    made = {}

    def run(name):
        if name not in made:
            out = tmp_path_factory.mktemp(f"uninterrupted_{name}") / "out"
            launch(args_for(corpus, out), num_processes=2, config_file=CONFIGS[name])
            made[name] = out
        return made[name]
    return run


def assert_same_weights(out, reference):
    res = json.loads((out / "results.json").read_text())
    assert (res["num_processes"], res["mixed_precision"]) == (2, "no")
    assert res["distributed_type"] == json.loads((reference / "results.json").read_text())["distributed_type"]
    ours, theirs = saved_weights(out), saved_weights(reference)
    assert ours.keys() == theirs.keys()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst < 1e-6, f"final weights differ from the uninterrupted run by up to {worst:.2e}"
    losses, expected = train_losses(out), train_losses(reference)
    assert sorted(losses) == sorted(expected)
    assert max(abs(losses[s] - expected[s]) for s in expected) < 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sigterm_to_every_process_saves_and_resumes(name, tmp_path, corpus, uninterrupted):
    out, log = tmp_path / "out", open(tmp_path / "preempted.log", "w+")
    process = start(corpus, out, CONFIGS[name], log)
    assert wait_for_step(out, process, 13), "the run did not reach step 13"
    processes = every_process(process)
    assert len(processes) >= 3  # the launcher and two workers
    for p in processes:  # as SLURM's --signal does: each process of the step, the launcher included
        p.send_signal(15)
    process.wait(timeout=240)
    log.seek(0)
    output = log.read()
    saved = [line for line in output.splitlines() if "SIGTERM received: saved" in line]
    assert saved, output[-5000:]
    step = int(saved[0].rsplit("after step ", 1)[1].split(";")[0])
    assert step > 10  # not the periodic checkpoint at 10: the one written on the signal
    assert (out / "checkpoints" / f"step_{step}" / "trainer_state.json").is_file()
    assert not list((out / "checkpoints").glob("*.tmp*"))
    # The workers exit 75 after saving; torchrun's agent, signalled itself, then exits 1 with its own
    # SignalException. No worker may have died on a second SIGTERM or crashed while saving.
    assert f'File "{ROOT / "train.py"}"' not in output, output[-5000:]
    assert "got signal: 15" in output or process.returncode == 75

    launch(args_for(corpus, out), num_processes=2, config_file=CONFIGS[name])
    assert_same_weights(out, uninterrupted(name))
    assert json.loads((out / "results.json").read_text())["distributed_type"] == DISTRIBUTED_TYPE[name]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sigkill_of_the_whole_group_at_random_moments(name, tmp_path, corpus, uninterrupted):
    out, rng = tmp_path / "out", random.Random(name)
    for attempt in range(3):
        log = open(tmp_path / f"killed{attempt}.log", "w")
        process = start(corpus, out, CONFIGS[name], log)
        if attempt == 1:  # while a checkpoint is being written
            ckpts = out / "checkpoints"
            deadline = time.time() + 300
            while time.time() < deadline and process.poll() is None and not (
                    ckpts.is_dir() and any(".tmp" in p.name for p in ckpts.iterdir())):
                time.sleep(0.002)
        else:
            wait_for_step(out, process, logged_step(out) + rng.randint(3, 12))
            time.sleep(rng.random() * 0.3)
        for p in every_process(process):
            p.kill()
        process.wait(timeout=60)
    launch(args_for(corpus, out), num_processes=2, config_file=CONFIGS[name])
    assert not list((out / "checkpoints").glob("*.tmp*"))
    assert_same_weights(out, uninterrupted(name))
