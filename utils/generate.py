"""Load a causal language model (a run's OUTPUT_DIR, one of its checkpoints, or any model) and sample
from it: the library behind generate.py and the sample train.py prints at the end.

A checkpoint written during training holds accelerate's model.safetensors with the model's
config.json and tokenizer, so it loads on its own, while the run is still going or after it stopped.
"""

import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, set_seed

from utils.checkpoint import STATE_FILE
from utils.errors import UserError, first_line


def load_model_and_tokenizer(path):
    """(model, tokenizer) from a model directory, a training checkpoint, or a Hub name (cached when offline)."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):  # a training checkpoint (it holds a config.json too)
        return _from_checkpoint(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return _from_pretrained(path)
    if os.path.exists(path):
        raise UserError(f"{path} holds no model (no config.json) and is not a training checkpoint (no {STATE_FILE}): "
                        "pass OUTPUT_DIR or OUTPUT_DIR/checkpoints/step_N")
    if path.startswith((".", "/", "~")) or path.count("/") > 1:  # a Hub name is 'name' or 'owner/name'
        raise UserError(f"{path} does not exist: pass OUTPUT_DIR, OUTPUT_DIR/checkpoints/step_N or a Hub name")
    return _from_pretrained(path)


def _from_pretrained(name):
    try:
        return AutoModelForCausalLM.from_pretrained(name), AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {name!r} ({type(e).__name__}: {first_line(e)}): pass a model "
                        "directory, a checkpoint directory, or a Hub name that is cached or reachable") from e


def _from_checkpoint(checkpoint):
    if not os.path.isfile(os.path.join(checkpoint, "model.safetensors")):
        raise UserError(f"checkpoint {checkpoint} has no model.safetensors (DeepSpeed and FSDP save sharded states): "
                        "generate from OUTPUT_DIR once the run has saved its model")
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    # a checkpoint carries its config and tokenizer; older ones borrow them from the run's saved model
    source = next((d for d in (checkpoint, run_dir) if os.path.isfile(os.path.join(d, "config.json"))), None)
    if source is None:
        raise UserError(f"checkpoint {checkpoint} has no config.json and its run has not saved a model yet: "
                        "generate from a newer checkpoint, or from OUTPUT_DIR once the run ends")
    config, tokenizer = AutoConfig.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    try:
        # generation_config given explicitly: transformers would look for it in the checkpoint and fail
        model = AutoModelForCausalLM.from_pretrained(checkpoint, config=config,
                                                     generation_config=GenerationConfig.from_model_config(config))
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load the weights of checkpoint {checkpoint} ({type(e).__name__}: {first_line(e)}): "
                        "is it from this run?") from e
    return model, tokenizer


@torch.no_grad()
def generate(model, tokenizer, prompt, max_new_tokens=50, temperature=0.8, top_k=50, top_p=1.0, seed=0, num_samples=1,
             synced_gpus=False):
    """`num_samples` continuations of `prompt` (prompt included), reproducible for a given seed.
    synced_gpus: every process calls this in lock-step (sharded parameters are gathered on each forward)."""
    set_seed(seed)
    model.eval()
    if prompt:
        inputs = tokenizer(prompt, return_tensors="pt")
    else:  # nothing to continue: start from the beginning-of-text token
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        inputs = {"input_ids": torch.tensor([[start]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
                            pad_token_id=pad, synced_gpus=synced_gpus, **sampling)
    return [tokenizer.decode(sequence, skip_special_tokens=True) for sequence in output]
