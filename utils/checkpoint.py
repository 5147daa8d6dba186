"""Resumable checkpoints that are either complete or absent, and the run state they carry.

`accelerator.save_state` writes model, optimizer, scheduler and every process's RNG states into
`checkpoints/step_N.tmp`; the main process then adds `trainer_state.json` (the TrainState, data
position, run config, process count and layout) with the model's config.json and tokenizer,
fsyncs it all and renames the directory to `step_N`. A directory named `step_N` is complete. A resume on another number of processes
reshards: DDP and FSDP2 checkpoints as they load, DeepSpeed's through its universal format
(`prepare_resume`). `Checkpointer` is what train.py talks to.
"""

import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field

from accelerate.utils import broadcast_object_list, gather_object

from utils.errors import UserError
from utils.faults import TrainingDiverged
from utils.files import publish, sync_filesystem, temporary_name, wait_for, write_atomic
from utils.mesh import layout

STATE_FILE = "trainer_state.json"
DEEPSPEED_TAG = "pytorch_model"  # accelerate's save_state names DeepSpeed's checkpoint tag so
UNIVERSAL = "universal"  # CHECKPOINT/universal: the DeepSpeed shards converted for another process count
_COMPLETE = re.compile(r"^step_(\d+)$")
SAVE_MARGIN = 60  # seconds a save on a stop signal leaves to spare: the step in flight, the exit
DELETING = ".old"  # step_N.old: a checkpoint being deleted in the background (never resumed from)


def checkpoints_dir(output_dir):
    return os.path.join(output_dir, "checkpoints")


def complete_checkpoints(output_dir):
    """Complete checkpoint directories in the order they were saved, oldest first.

    Saving order, not step order: a run resumed from an older checkpoint saves lower steps after
    the higher ones of the run it replaced, and its newest checkpoint is the one to continue from."""
    root = checkpoints_dir(output_dir)
    if not os.path.isdir(root):
        return []
    found = [(_save_index(os.path.join(root, name)), int(m.group(1)), os.path.join(root, name))
             for name in os.listdir(root)
             if (m := _COMPLETE.match(name)) and os.path.isfile(os.path.join(root, name, STATE_FILE))]
    return [path for *_, path in sorted(found)]


def _save_index(checkpoint):
    try:
        with open(os.path.join(checkpoint, STATE_FILE)) as f:
            return int(json.load(f).get("save_index", 0))
    except (OSError, ValueError, TypeError):
        return 0  # unreadable: oldest (resolve_resume reports it if it is ever picked)


def _step_of(checkpoint):
    """A complete checkpoint's step, from its directory name (step_N)."""
    return int(_COMPLETE.match(os.path.basename(checkpoint)).group(1))


def rollbacks_of_this_spike(rollbacks, step, window):
    """How many of the last rollbacks a spike at `step` came back after: each came back within `window`
    training steps of the one before (a spike months later is another spike)."""
    count, since = 0, step
    for earlier in reversed(rollbacks):
        if since - earlier["to_step"] > window:
            break
        count, since = count + 1, earlier["at_step"]
    return count


def resolve_resume(output_dir, requested):
    """(checkpoint directory, its state) to resume from, or (None, None) to start fresh.

    Called before any expensive work, so a bad --resume_from_checkpoint fails at once."""
    if not requested:
        return None, None
    if requested == "latest":
        found = complete_checkpoints(output_dir)
        return (found[-1], read_state(found[-1])) if found else (None, None)
    if not os.path.isfile(os.path.join(requested, STATE_FILE)):
        raise UserError(f"--resume_from_checkpoint {requested} is not a complete checkpoint (no {STATE_FILE}): "
                        f"pass a step_N directory under {checkpoints_dir(output_dir)} or 'latest'")
    return requested, read_state(requested)


def read_state(checkpoint):
    try:
        with open(os.path.join(checkpoint, STATE_FILE)) as f:
            state = json.load(f)
        missing = {"step", "epoch", "data_position", "samples_per_step", "initial_eval_loss"} - set(state)
        if missing:
            raise KeyError(", ".join(sorted(missing)))
        return state
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint {checkpoint} is corrupt ({type(e).__name__}: {e}): "
                        "resume from an earlier one or start fresh") from e


def prepare_resume(accelerator, checkpoint, state, mesh=None):
    """Before `accelerator.prepare`: the directory `load_checkpoint` will read.

    DDP checkpoints hold whole tensors and FSDP2 ones are `torch.distributed.checkpoint` shards that
    reshard on load, so both resume on any number of processes as they are. DeepSpeed's ZeRO shards
    are tied to the process count that wrote them: for another count, DeepSpeed's own converter
    (ds_to_universal) turns them into its universal format once, kept in CHECKPOINT/universal, and
    DeepSpeed is told to load that, which it reads only when its engine is built."""
    running = accelerator.distributed_type.value
    saved_as, running_as = _layout(state.get("distributed_type", running)), _layout(running)
    if saved_as != running_as:
        raise UserError(f"{checkpoint} holds {saved_as} state and this run uses {running_as}: resume with the "
                        "kind of accelerate config that wrote it (the process count may differ)")
    saved_by = state.get("num_processes", accelerator.num_processes)
    saved_on = state.get("mesh")
    if saved_by != accelerator.num_processes or saved_on != mesh:
        def on(sizes):  # the mesh, where a parallelism_config made one on either side
            return f" ({layout(sizes)})" if saved_on or mesh else ""
        accelerator.print(f"notice: {checkpoint} was saved by {saved_by} processes{on(saved_on)}, this run has "
                          f"{accelerator.num_processes}{on(mesh)}; the data position "
                          f"({state['step'] * state['samples_per_step']} sequences) and the optimizer state carry "
                          f"over exactly{' (DCP reshards them onto this mesh)' if saved_on or mesh else ''}")
    if accelerator.state.deepspeed_plugin is None or saved_by == accelerator.num_processes:
        return checkpoint
    universal = os.path.join(checkpoint, UNIVERSAL)
    if not os.path.isdir(universal):
        if accelerator.is_main_process:
            accelerator.print(f"converting {checkpoint} to DeepSpeed's universal format for {accelerator.num_processes} "
                              "processes (about 2 minutes per billion parameters; convert_checkpoint.py does it "
                              "before the job)")
            convert_to_universal(checkpoint)
        else:  # a wait on the filesystem, not in a collective: no --ddp_timeout cuts a long conversion short
            wait_for([universal], f"the universal format of {checkpoint}, which the main process converts")
    accelerator.state.deepspeed_plugin.deepspeed_config.setdefault("checkpoint", {})["load_universal"] = True
    return universal


def _layout(distributed_type):
    """How a distributed type stores its checkpoint: DeepSpeed shards, FSDP DCP shards, or whole tensors."""
    return {"DEEPSPEED": "DeepSpeed ZeRO", "FSDP": "FSDP"}.get(distributed_type, "whole-model (DDP / 1 process)")


def conversion_workers(checkpoint, cpus=None, available=None):
    """Processes for ds_to_universal: every core this process may use, as long as each has memory for the
    largest ZeRO shard file twice over (an extract worker loads one whole file; a merge worker holds one
    parameter's slices), within the machine's and the job's (cgroup: SLURM, containers) limits."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
        try:  # cgroup v2: the job's own limit
            limit = open("/sys/fs/cgroup/memory.max").read().strip()
            if limit != "max":
                available = min(available, int(limit) - int(open("/sys/fs/cgroup/memory.current").read()))
        except (OSError, ValueError):
            pass
    shards = [entry.stat().st_size for entry in os.scandir(os.path.join(checkpoint, DEEPSPEED_TAG))
              if entry.name.endswith("optim_states.pt")]
    return max(1, min(cpus, available // max(2 * max(shards, default=1), 1)))


def convert_to_universal(checkpoint, workers=None):
    """CHECKPOINT/universal: DeepSpeed's universal format of a ZeRO checkpoint, for a resume on another
    process count; with `workers` processes (default: conversion_workers). Returns its path."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    universal = os.path.join(checkpoint, UNIVERSAL)
    workers = workers or conversion_workers(checkpoint)
    for name in os.listdir(checkpoint):  # left by a conversion that was killed
        if name.startswith(UNIVERSAL + ".tmp"):
            shutil.rmtree(os.path.join(checkpoint, name), ignore_errors=True)
    tmp = temporary_name(universal)
    os.makedirs(tmp)
    try:
        ds_to_universal(argparse.Namespace(
            input_folder=os.path.join(checkpoint, DEEPSPEED_TAG), output_folder=os.path.join(tmp, DEEPSPEED_TAG),
            num_extract_workers=workers, num_merge_workers=workers, keep_temp_folder=False, strict=True,
            inject_missing_state=True))  # transformers models carry no universal_checkpoint_info of their own
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot convert {checkpoint} to DeepSpeed's universal format ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}): resume with "
                        "the process count that saved it") from e
    for name in os.listdir(checkpoint):  # accelerate's own files: RNG states, scheduler, trainer state
        if os.path.isfile(os.path.join(checkpoint, name)) and name != "latest":
            shutil.copy2(os.path.join(checkpoint, name), tmp)
    return publish(tmp, universal)


def load_checkpoint(accelerator, checkpoint, state, samples_per_step, model=None):
    """Restore model, optimizer, scheduler and RNG states, refusing a run whose batch would shift the data."""
    if state["samples_per_step"] != samples_per_step:
        raise UserError(f"{checkpoint} was trained with {state['samples_per_step']} sequences per optimizer step, this "
                        f"run has {samples_per_step}, which would repeat or skip data: pass --global_batch_size "
                        f"{state['samples_per_step']}")
    try:
        accelerator.load_state(checkpoint)
    except Exception as e:  # torch, safetensors and DeepSpeed each raise their own types for a damaged file
        raise UserError(f"checkpoint {checkpoint} is corrupt ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                        "resume from an earlier one or start fresh") from e
    if os.path.basename(checkpoint) == UNIVERSAL and getattr(model, "zero_optimization_stage", lambda: 0)() == 3:
        _repair_zero3_universal_load(model.optimizer.optimizer, checkpoint)
    if os.path.basename(checkpoint) == UNIVERSAL and hasattr(model, "_config"):  # loaded: this run's own
        model._config.load_universal_checkpoint = False  # checkpoints (a rollback's) are not universal
    # load_state restores accelerate's micro-batch counter, counted under the saved run's accumulation
    # (2 processes x 1 saved at step 3 = 3, which 1 process x 2 would read as half-way through a step).
    # A checkpoint always sits on an optimizer-step boundary: the next micro-batch starts a new step.
    accelerator.step = 0


def _repair_zero3_universal_load(optimizer, universal):
    """Two bugs of DeepSpeed 0.19.8's ZeRO-3 universal load, undone: every parameter group gets the
    first group's hyper-parameters (the no-decay group would decay), and all sub-groups share one
    Adam `step` tensor (stepped once per group, so the bias correction runs ahead)."""
    import torch

    saved = torch.load(os.path.join(universal, DEEPSPEED_TAG, "zero", "optimizer_state.pt"),
                       weights_only=False)["param_groups"]
    for group, saved_group in zip(optimizer.param_groups, saved):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for param_state in optimizer.state.values():
        if torch.is_tensor(param_state.get("step")):
            param_state["step"] = param_state["step"].clone()


def remove_incomplete(output_dir):
    """Delete step_N.tmp directories left by runs killed while saving."""
    root = checkpoints_dir(output_dir)
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


class BackgroundDeleter:
    """Deletes old checkpoints off the training path (hundreds of GB at 70B take minutes): a checkpoint
    is first renamed to step_N.old, which no resume ever picks, then removed by a thread. Leftovers of a
    run killed while deleting go the same way on its next save."""

    def __init__(self):
        self._threads = []

    def delete(self, paths, root):
        doomed = [os.path.join(root, name) for name in os.listdir(root) if name.endswith(DELETING)]
        for path in paths:  # a unique name: a leftover step_N.old of a killed run may still be there
            doomed.append(temporary_name(path) + DELETING)
            os.replace(path, doomed[-1])
        if doomed:
            thread = threading.Thread(target=lambda: [shutil.rmtree(p, ignore_errors=True) for p in doomed],
                                      name="delete-checkpoints")
            thread.start()
            self._threads.append(thread)

    def wait(self):
        for thread in self._threads:
            thread.join()
        self._threads = []


def save_checkpoint(accelerator, output_dir, state, total_limit=None, model_files=(), deleter=None):
    """Save a checkpoint for optimizer step state['step'] and rotate old ones; call on every process.
    model_files: objects with `save_pretrained` (the model config, the tokenizer) saved beside the
    weights, so tools load a checkpoint on its own (generate.py). deleter: a BackgroundDeleter for the
    old ones (else they are deleted here)."""
    root = checkpoints_dir(output_dir)
    final = os.path.join(root, f"step_{state['step']}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        remove_incomplete(output_dir)
        saved = complete_checkpoints(output_dir)
        state = {**state, "save_index": _save_index(saved[-1]) + 1 if saved else 1}
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    # Every process flushes what it wrote before the barrier that precedes the rename: files other nodes
    # wrote are on their disks too when step_N appears, also after one of them loses power.
    synced = gather_object([sync_filesystem(tmp)])  # also the barrier
    if accelerator.is_main_process:
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({**state, "synced_processes": sum(synced)}, f, indent=2)
        for item in model_files:
            item.save_pretrained(tmp)
        publish(tmp, final)  # fsyncs every file of the checkpoint, then renames
        if total_limit:  # the oldest saved go; the one just written is the newest and always stays
            old = complete_checkpoints(output_dir)[:-total_limit]
            if deleter:
                deleter.delete(old, root)
            else:
                for path in old:
                    shutil.rmtree(path)
    accelerator.wait_for_everyone()
    return final


@dataclass
class TrainState:
    """Where a run stands: a checkpoint saves it whole, a resume restores it whole."""
    step: int = 0  # optimizer steps done
    epoch: int = 0
    samples_in_epoch: int = 0  # sequences of this epoch already read (the data position)
    initial_eval_loss: float | None = None
    data_steps: int = 0  # optimizer steps' worth of data read: `step` plus what rollbacks skipped
    rollbacks: list = field(default_factory=list)  # each rollback: steps, the data it skipped

    def step_done(self, samples_per_step):
        self.step += 1
        self.data_steps += 1
        self.samples_in_epoch += samples_per_step

    def epoch_done(self):
        self.epoch, self.samples_in_epoch = self.epoch + 1, 0


class Checkpointer:
    """The run's checkpoints: it resolves the one to resume from before any work (a bad path fails at
    once), converts it for another layout before `accelerator.prepare`, restores it after, decides
    when to save (every `every` steps, or on demand) and rotates old ones."""

    def __init__(self, output_dir, every=None, total_limit=None, resume=None, mesh=None):
        self.output_dir, self.every, self.total_limit, self.requested = output_dir, every, total_limit, resume
        self.mesh = mesh.record() if mesh else None  # a parallelism_config's sizes (utils/mesh.py)
        self.resume_from, self.resume_state = resolve_resume(output_dir, resume)
        self._load_from, self.data = None, None
        self.deleter = BackgroundDeleter()
        self.save_seconds = None  # the slowest save of this run so far, on any process

    def check_data(self, signature):
        """Refuse to resume on other training data than the checkpoint's (utils/data.py data_signature),
        at any step, mid-epoch or at an epoch's end: the data position and the draws per source it
        records are only meaningful for the same sources, weights and splits. Remembered for saves."""
        self.data = signature
        saved = (self.resume_state or {}).get("data")
        if not isinstance(saved, dict) or saved == json.loads(json.dumps(signature)):
            return  # the same data, or a checkpoint from before data signatures
        if saved["tokenizer"] != signature["tokenizer"]:
            raise UserError(f"{self.resume_from} was trained with another tokenizer than this run's (a tokenizer trained "
                            f"here on another sample?): resume with --tokenizer_name {self.resume_from}")
        saved, signature = saved["sources"], signature["sources"]
        changes = [f"{old.get('label')}: {key} {old.get(key)} -> {new.get(key)}" for old, new in zip(saved, signature)
                   for key in ("label", "weight", "held_out", "train_blocks", "content") if old.get(key) != new.get(key)]
        if len(saved) != len(signature):
            changes = [f"{len(saved)} sources -> {len(signature)}"]
        raise UserError(f"the training data changed since {self.resume_from} ({'; '.join(changes[:3])}): resume with "
                        "the same sources, weights, --max_eval_samples and --validation_split_percentage, or start "
                        "a new --output_dir")

    @property
    def resumed_data_position(self):
        """The data position of the checkpoint to resume from (None: starting fresh)."""
        return (self.resume_state or {}).get("data_position")

    def before_prepare(self, accelerator):
        if self.resume_from:
            self._load_from = prepare_resume(accelerator, self.resume_from, self.resume_state, self.mesh)

    def restore(self, accelerator, model, train_order, samples_per_step, run_config, model_files=(), spikes=None):
        """The TrainState to start from (restored, or fresh); remembers what later saves record:
        run_config (the flags), model_files saved with each checkpoint (model config, tokenizer) and
        the spike detector (utils/spikes.py), whose state a checkpoint holds too."""
        self.accelerator, self.train_order, self.samples_per_step = accelerator, train_order, samples_per_step
        self.run_config, self.model_files, self.spikes, self.model = run_config, model_files, spikes, model
        if not self.resume_from:
            if self.requested:
                accelerator.print(f"no checkpoint in {checkpoints_dir(self.output_dir)} yet: starting fresh")
            return TrainState()
        load_checkpoint(accelerator, self._load_from, self.resume_state, samples_per_step, model)
        saved = self.resume_state
        state = TrainState(step=saved["step"], epoch=saved["epoch"], initial_eval_loss=saved["initial_eval_loss"],
                           data_steps=saved.get("data_steps", saved["step"]), rollbacks=saved.get("rollbacks", []))
        if spikes is not None:
            spikes.load_state_dict(saved.get("spikes"))
        position = saved["data_position"]
        if position["epoch_complete"]:  # saved after an epoch's last step
            state.epoch += 1
        else:
            state.samples_in_epoch = position["samples_into_epoch"]
            train_order.start_at(position)  # exact, and nothing before it is read again
        accelerator.print(f"resumed from {self.resume_from} at step {state.step}")
        return state

    def due(self, step):
        return bool(self.every) and step % self.every == 0

    def save(self, state):
        """Save `state` with the model, optimizer, scheduler and RNG states; call on every process.
        While a loss spike may be starting, the save deletes no older checkpoint: a rollback may need one."""
        suspect = self.spikes is not None and self.spikes.suspect
        start = time.perf_counter()
        path = save_checkpoint(self.accelerator, self.output_dir, self._record(state),
                               None if suspect else self.total_limit, self.model_files, self.deleter)
        slowest = max(gather_object([time.perf_counter() - start]))  # the same number on every process
        self.save_seconds = max(self.save_seconds or 0.0, slowest)
        return path

    def save_fits(self, seconds_left):
        """Whether a save started now ends before the process is killed, judged by the slowest save so far
        with a quarter more and SAVE_MARGIN seconds to spare (none yet: try). The same answer on every
        process: both numbers are agreed."""
        return self.save_seconds is None or seconds_left >= 1.25 * self.save_seconds + SAVE_MARGIN

    def _record(self, state):
        """trainer_state.json of a checkpoint of `state` (collective: the data position may be every process's)."""
        accelerator = self.accelerator
        return dict(
            step=state.step, epoch=state.epoch, samples_seen=state.data_steps * self.samples_per_step,
            data_steps=state.data_steps, data_position=self._data_position(state.samples_in_epoch),
            samples_per_step=self.samples_per_step, initial_eval_loss=state.initial_eval_loss, data=self.data,
            config=self.run_config, rollbacks=state.rollbacks,
            spikes=self.spikes.state_dict() if self.spikes is not None else None,
            num_processes=accelerator.num_processes, distributed_type=accelerator.distributed_type.value, mesh=self.mesh)

    def rollback(self, state, max_rollbacks):
        """A sustained loss spike (utils/spikes.py): load the newest checkpoint saved before its first outlier
        (weights, optimizer, schedule, RNG, the detector's window) and keep reading the data from where it
        stands, so what led into the spike is skipped. That checkpoint's trainer_state.json then records
        the new data position and the checkpoints saved after it go: a resume, or a second rollback to it,
        never reads the skipped data again. Returns (the new TrainState, the rollback's record), or (state,
        None) with no checkpoint from before the spike (the outliers are skipped, the run goes on). Stops
        the run (exit code 3, checkpoints kept) when one spike needs more than `max_rollbacks`: rollbacks
        that each came back within a detector window of the one before count as one spike's."""
        accelerator, spikes = self.accelerator, self.spikes
        first = spikes.outliers[0]
        again = rollbacks_of_this_spike(state.rollbacks, state.step, spikes.window)
        if again >= max_rollbacks:
            raise TrainingDiverged(f"stopped at step {state.step}: a loss spike since step {first} came back after "
                                   f"{again} rollbacks (--max_rollbacks {max_rollbacks}); checkpoints kept: lower "
                                   "--learning_rate, check the data near the steps in metrics.jsonl, then resume")
        target = [None]
        if accelerator.is_main_process:
            before = [path for path in complete_checkpoints(self.output_dir) if _step_of(path) < first]
            target = [before[-1] if before else None]
        target = broadcast_object_list(target)[0]
        if target is None:
            spikes.outliers = []  # skipped, as isolated ones; the next sustained spike may find a checkpoint
            return state, None
        saved = read_state(target)
        if accelerator.state.deepspeed_plugin is not None and saved.get("num_processes") != accelerator.num_processes:
            raise TrainingDiverged(f"stopped at step {state.step}: a loss spike since step {first}, and {target} was "
                                   f"saved by {saved.get('num_processes')} DeepSpeed processes, not "
                                   f"{accelerator.num_processes}: resume from it (it converts) to roll back")
        self.deleter.wait()
        load_checkpoint(accelerator, target, saved, self.samples_per_step, self.model)
        saved_data_steps = saved.get("data_steps", saved["step"])
        rolled = dict(at_step=state.step, to_step=saved["step"], outliers=list(spikes.outliers),
                      data_steps_skipped=[saved_data_steps + 1, state.data_steps], checkpoint=os.path.basename(target))
        if accelerator.is_main_process:  # blocks per source read and not trained on (results.json's sources)
            def drawn(steps):  # per source in the run's first `steps` steps of data (one source: all of them)
                order = self.train_order
                return order.drawn(steps * self.samples_per_step) if hasattr(order, "drawn") else [steps * self.samples_per_step]
            before = saved["data_position"].get("drawn") or drawn(saved_data_steps)  # a stream's: as it stood then
            rolled["skipped_blocks"] = [int(a) - int(b) for a, b in zip(drawn(state.data_steps), before)]
        new = TrainState(step=saved["step"], epoch=state.epoch, samples_in_epoch=state.samples_in_epoch,
                         initial_eval_loss=state.initial_eval_loss, data_steps=state.data_steps,
                         rollbacks=[*state.rollbacks, rolled])
        spikes.load_state_dict(saved.get("spikes"))  # the window as it was before the spike
        spikes.outliers = []  # an older spike's outliers must not count towards the next rollback
        record = self._record(new)
        if accelerator.is_main_process:  # first the target's new state (newest, past the spike), then the rest goes
            saved_after = complete_checkpoints(self.output_dir)
            write_atomic(os.path.join(target, STATE_FILE), json.dumps(
                {**saved, **record, "save_index": _save_index(saved_after[-1]) + 1}, indent=2))
            self.deleter.delete(saved_after[saved_after.index(target) + 1:], checkpoints_dir(self.output_dir))
        accelerator.wait_for_everyone()
        return new, rolled

    def close(self):
        """Wait for old checkpoints' deletion in the background to end (before the process exits)."""
        self.deleter.wait()

    def _data_position(self, samples_into_epoch):
        """The order's position: the main process's (one order for the job, or streams it reads and
        accelerate dispatches), or every process's own parts of the streams together."""
        order = self.train_order
        if not order.each_process_reads:
            return order.position(samples_into_epoch) if self.accelerator.is_main_process else None
        return order.merge(gather_object([order.position(samples_into_epoch)]))
