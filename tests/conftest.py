"""Shared helpers: an offline environment, a small corpus, and real `accelerate launch` runs."""

import atexit
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
_ports = itertools.count(29500 + os.getpid() % 1000 * 20)

# A tiny model and short run: real training, seconds per launch on 2 CPU cores.
TINY = ["--model_preset", "tiny", "--block_size", "32", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8", "--vocab_size", "512", "--learning_rate", "3e-3",
        "--logging_steps", "1", "--sample_max_new_tokens", "5"]


def _offline_env():
    """Offline, with every cache in one temporary directory; set before any library reads it."""
    base = Path(tempfile.mkdtemp(prefix="clm-tests-"))
    (base / "tmp").mkdir()
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
           "HF_HOME": str(base / "hf"), "WANDB_DIR": str(base / "wandb"), "TMPDIR": str(base / "tmp"),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/torch_extensions")),
           "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}
    os.environ.update(env)
    atexit.register(shutil.rmtree, base, ignore_errors=True)


_offline_env()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A few hundred KB of real English prose (Python's help topics) as JSON lines."""
    import pydoc_data.topics

    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    texts = sorted(pydoc_data.topics.topics.values())[:60]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _config_path(config_file):
    return ROOT / "accelerate_configs" / config_file  # a path stays itself


def launch_command(args, num_processes=1, config_file=None, extra_env=None, launch_args=(), port=None):
    """(command, environment) of `accelerate launch train.py ARGS` as a user would run it.
    config_file: a file in accelerate_configs/ (or a path), run with --mixed_precision no on CPU;
    an FSDP config goes through tests/cpu_fsdp.py, the test-only shim that makes FSDP2 run on CPU."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(port or next(_ports)),
           *map(str, launch_args)]
    if config_file:  # a file in accelerate_configs/ or a path; the CPU stand-in for its GPU settings
        cmd += ["--config_file", str(_config_path(config_file)), "--num_processes", str(num_processes)]
    elif num_processes > 1:
        cmd += ["--multi_gpu", "--num_processes", str(num_processes)]
    else:
        cmd += ["--cpu", "--num_processes", "1"]
    if "--num_machines" not in cmd:
        cmd += ["--num_machines", "1"]
    cmd += ["--dynamo_backend", "no", "--mixed_precision", "no"]
    if config_file and "distributed_type: FSDP" in _config_path(config_file).read_text():
        cmd.append(str(ROOT / "tests" / "cpu_fsdp.py"))
    env = {**os.environ, **(extra_env or {})}
    if num_processes > 1 and not config_file:
        env["ACCELERATE_USE_CPU"] = "1"  # --multi_gpu alone would start independent, unsynced runs on CPU
    return cmd + [str(ROOT / "train.py"), *map(str, args)], env


def launch(args, num_processes=1, config_file=None, extra_env=None, check=True, timeout=600, launch_args=()):
    """`accelerate launch train.py ARGS` as a user would run it; returns the CompletedProcess."""
    cmd, env = launch_command(args, num_processes, config_file, extra_env, launch_args)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def saved_model_eval_loss(model_dir, train_file, block_size=32):
    """Validation loss of a saved model, recomputed in this process through the same data pipeline."""

    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.config import parse_args
    from utils.data import tokenize_and_pack
    from utils.sources import load_source

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = parse_args(["--train_file", str(train_file), "--output_dir", str(model_dir)])
    sources = [load_source(args.sources[0])]
    blocks = tokenize_and_pack(sources, tokenizer, block_size, PartialState())[0]["validation"]
    with torch.no_grad():
        losses = [model(input_ids=blocks[i]["input_ids"][None], labels=blocks[i]["input_ids"][None]).loss
                  for i in range(len(blocks))]
    return torch.stack(losses).mean().item()


def saved_weights(model_dir):
    """The final model's tensors by name, from model.safetensors or from the shards its index names
    (a run on several processes: utils/export.py)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    if (model_dir / "model.safetensors").exists():
        return load_file(str(model_dir / "model.safetensors"))
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    weights = {}
    for name in sorted(set(index["weight_map"].values())):
        weights.update(load_file(str(model_dir / name)))
    assert weights.keys() == index["weight_map"].keys()
    return weights


def read_metrics(output_dir):
    with open(Path(output_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def train_losses(output_dir):
    return {r["step"]: r["loss"] for r in read_metrics(output_dir) if "loss" in r}


def results(output_dir):
    return json.loads((Path(output_dir) / "results.json").read_text())
