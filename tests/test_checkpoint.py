"""Checkpoint bookkeeping and the files a resume reads: rotation, 'latest', metrics.jsonl, atomic publishing."""

import json
import math
import os

import pytest
import torch
from accelerate import Accelerator

import utils.checkpoint
from utils.checkpoint import BackgroundDeleter, complete_checkpoints, resolve_resume, save_checkpoint
from utils.files import publish, temporary_name
from utils.metrics import MetricsLog, perplexity


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def save(accelerator, output_dir, step, limit, deleter=None):
    return save_checkpoint(accelerator, str(output_dir), dict(step=step, epoch=0, data_position=None,
                                                              samples_per_step=8, initial_eval_loss=1.0), limit,
                           deleter=deleter)


def test_resuming_an_older_checkpoint_keeps_the_one_just_written(tmp_path, accelerator):
    """Checkpoints 4 and 8 exist; a run resumed from 4 saves 6 with a limit of 1. Sorting by step
    would keep 8 (from the abandoned run) and delete 6; 6 is the newest and must stay, and 'latest'
    must continue from it."""
    save(accelerator, tmp_path, 4, 2)
    save(accelerator, tmp_path, 8, 2)
    just_written = save(accelerator, tmp_path, 6, 1)
    assert [os.path.basename(p) for p in complete_checkpoints(tmp_path)] == ["step_6"]
    assert resolve_resume(str(tmp_path), "latest")[0] == just_written


def test_old_checkpoints_are_deleted_off_the_training_path(tmp_path, accelerator, monkeypatch):
    """Rotation renames the old checkpoint (never resumed from again) and deletes it in a thread: the
    save returns while the deletion still runs; a leftover of a killed run goes at the next rotation."""
    import threading

    release, deleting = threading.Event(), []
    real_rmtree = utils.checkpoint.shutil.rmtree

    def slow_rmtree(path, **kwargs):
        deleting.append(os.path.basename(path))
        release.wait(30)
        real_rmtree(path, **kwargs)
    monkeypatch.setattr(utils.checkpoint.shutil, "rmtree", slow_rmtree)
    deleter = BackgroundDeleter()
    for step in (2, 4):
        save(accelerator, tmp_path, step, 1, deleter)
    root = tmp_path / "checkpoints"
    doomed, kept = sorted(os.listdir(root))
    assert doomed.startswith("step_2.") and doomed.endswith(".old") and kept == "step_4"  # deletion still running
    assert resolve_resume(str(tmp_path), "latest")[0] == str(root / "step_4")
    release.set()
    deleter.wait()
    assert deleting == [doomed] and os.listdir(root) == ["step_4"]
    (root / "step_6.old").mkdir()  # left by a run killed while deleting, under the name step_6 will get
    (root / "step_6.old" / "trainer_state.json").write_text("{}")
    for step in (6, 8):
        save(accelerator, tmp_path, step, 1, deleter)
    deleter.wait()
    assert os.listdir(root) == ["step_8"]


def test_each_process_flushes_what_it_wrote_before_the_rename(tmp_path, accelerator, monkeypatch):
    synced = []
    monkeypatch.setattr(utils.checkpoint, "sync_filesystem",
                        lambda path: synced.append((path, sorted(os.listdir(path)))) or True)
    final = save(accelerator, tmp_path, 3, None)
    assert synced == [(final + ".tmp", ["random_states_0.pkl"])]  # what save_state wrote, not yet renamed
    assert json.loads(open(os.path.join(final, "trainer_state.json")).read())["synced_processes"] == 1


def test_latest_is_the_last_saved_not_the_highest_step(tmp_path, accelerator):
    for step in (4, 8, 6):
        save(accelerator, tmp_path, step, None)
    assert [os.path.basename(p) for p in complete_checkpoints(tmp_path)] == ["step_4", "step_8", "step_6"]
    assert os.path.basename(resolve_resume(str(tmp_path), "latest")[0]) == "step_6"


def test_truncated_metrics_line_does_not_stop_a_resume(tmp_path, accelerator):
    """A run killed mid-write leaves half a JSON line at the end of metrics.jsonl."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    MetricsLog(accelerator, str(tmp_path), keep_through_step=4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_a_resume_keeps_the_spike_events_of_the_data_before_its_checkpoint(tmp_path, accelerator):
    """A rollback from step 45 to 40 skipped the data of steps 41-45; the rewritten step_40 holds data
    step 45. A resume from it keeps the skips that led to the rollback (steps 43-45 by number, but their
    data is before the checkpoint's) and the rollback itself, and drops what it logs again."""
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0} for s in range(1, 46)] + [
        {"step": 43, "event": "skipped", "data_step": 43}, {"step": 45, "event": "skipped", "data_step": 45},
        {"step": 40, "event": "rollback", "data_steps_skipped": [41, 45]}] + [
        {"step": s, "loss": 1.0} for s in range(41, 51)] + [{"step": 47, "event": "skipped", "data_step": 52}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    MetricsLog(accelerator, str(tmp_path), keep_through_step=40, keep_through_data_step=45)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in kept if "loss" in r] == list(range(1, 41))
    assert [r["step"] for r in kept if "event" in r] == [43, 45, 40]


def test_perplexity_of_a_huge_loss_is_inf():
    assert perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert perplexity(800.0) == math.inf  # math.exp raises OverflowError above ~709


def test_publish_counts_a_peer_that_finished_first(tmp_path):
    """Two processes (two nodes on a shared cache) build the same directory; the second rename
    must not fail with 'Directory not empty' but keep the first result."""
    final = tmp_path / "tokenizer"
    for content in ("first", "second"):
        tmp = temporary_name(final) + content
        os.makedirs(tmp)
        (tmp_path / os.path.basename(tmp) / "vocab.json").write_text(content)
        publish(tmp, final, keep_existing=True)
    assert (final / "vocab.json").read_text() == "first"
    assert sorted(os.listdir(tmp_path)) == ["tokenizer"]


def test_publish_replaces_a_checkpoint_directory(tmp_path):
    final = tmp_path / "step_4"
    for content in ("old", "new"):
        tmp = tmp_path / "step_4.tmp"
        tmp.mkdir()
        (tmp / "state").write_text(content)
        publish(str(tmp), str(final))
    assert (final / "state").read_text() == "new"


def test_saved_state_round_trips(tmp_path, accelerator):
    path = save(accelerator, tmp_path, 3, None)
    _, state = resolve_resume(str(tmp_path), path)
    assert (state["step"], state["save_index"]) == (3, 1)
    assert torch.load(os.path.join(path, "random_states_0.pkl"), weights_only=False)  # accelerate's RNG states


def test_a_checkpoint_of_another_layout_is_refused_in_one_line(tmp_path, accelerator):
    """A DeepSpeed checkpoint under a DDP / 1-process config (or FSDP under DeepSpeed) cannot load;
    say so before the engine is built instead of reporting a 'corrupt' checkpoint."""
    from utils.checkpoint import prepare_resume
    from utils.errors import UserError

    state = dict(step=3, samples_per_step=8, num_processes=2, distributed_type="DEEPSPEED")
    with pytest.raises(UserError, match="holds DeepSpeed ZeRO state and this run uses whole-model"):
        prepare_resume(accelerator, str(tmp_path), state)
    state["distributed_type"] = "MULTI_GPU"  # DDP on 2 processes: loads on 1 as it is
    assert prepare_resume(accelerator, str(tmp_path), state) == str(tmp_path)


def test_temporary_names_differ_between_hosts_with_the_same_pid(monkeypatch):
    """Containers on two nodes sharing a filesystem often run the writer under the same PID."""
    import re
    import socket

    import utils.files as files

    mine = temporary_name("/shared/cache/x")
    assert mine != temporary_name("/shared/cache/x")  # a random part too: containers may share a host name
    monkeypatch.setattr(files, "_HOST", "other-node")
    assert "other-node" in temporary_name("/shared/cache/x") and str(os.getpid()) in mine
    assert mine.startswith(f"/shared/cache/x.tmp{re.sub(r'[^A-Za-z0-9_.-]', '_', socket.gethostname())}-")


def test_conversion_uses_every_core_that_has_memory_for_two_shard_files(tmp_path):
    from utils.checkpoint import DEEPSPEED_TAG, conversion_workers

    shards = tmp_path / DEEPSPEED_TAG
    shards.mkdir()
    for rank, size in ((0, 1000), (1, 3000)):
        (shards / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x" * size)
    assert conversion_workers(tmp_path, cpus=64, available=10**9) == 64  # memory for every core
    assert conversion_workers(tmp_path, cpus=64, available=6000 * 5) == 5  # 2 x the largest file each
    assert conversion_workers(tmp_path, cpus=64, available=100) == 1  # at least one, as before
