"""Resumable checkpoints that are either complete or absent.

`accelerator.save_state` writes model, optimizer, scheduler and every process's RNG states into
`checkpoints/step_N.tmp`; the main process then adds `trainer_state.json` (step, data position,
run config) and renames the directory to `step_N`. A directory named `step_N` is complete.
"""

import json
import os
import re
import shutil

from utils.config import UserError

STATE_FILE = "trainer_state.json"
_COMPLETE = re.compile(r"^step_(\d+)$")


def checkpoints_dir(output_dir):
    return os.path.join(output_dir, "checkpoints")


def complete_checkpoints(output_dir):
    """Complete checkpoint directories, oldest first."""
    root = checkpoints_dir(output_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root)
             if (m := _COMPLETE.match(name)) and os.path.isfile(os.path.join(root, name, STATE_FILE))]
    return [path for _, path in sorted(found)]


def resolve_resume(output_dir, requested):
    """The checkpoint directory to resume from, or None to start fresh; checked before any work."""
    if not requested:
        return None
    if requested == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(requested, STATE_FILE)):
        raise UserError(f"--resume_from_checkpoint {requested} is not a complete checkpoint (no {STATE_FILE}): "
                        f"pass a step_N directory under {checkpoints_dir(output_dir)} or 'latest'")
    return requested


def read_state(checkpoint):
    try:
        with open(os.path.join(checkpoint, STATE_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {checkpoint} is corrupt ({e}): resume from an earlier one") from e


def save_checkpoint(accelerator, output_dir, state, total_limit=None):
    """Save a checkpoint for optimizer step state['step'] and rotate old ones; call on every process."""
    final = os.path.join(checkpoints_dir(output_dir), f"step_{state['step']}")
    tmp = final + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)  # left by a run killed mid-save
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit:
            for old in complete_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
