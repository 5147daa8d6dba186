"""OUTPUT_DIR as a Hugging Face Hub model repository: generation ids, a model card, the upload.

A finished run's OUTPUT_DIR holds config.json, model.safetensors (or its shards and index), the tokenizer files,
generation_config.json and a model card (README.md), so `--push_to_hub` uploads it as it is and
`from_pretrained` / `pipeline` load it from the Hub or from disk alike.
"""

import json
import os

import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token

from utils.errors import UserError
from utils.report import batch_math, config_table, describe_data, load_run, metrics_table, millions

# Not uploaded: resumable training state (optimizer moments, RNG states; several times the model's
# size) and wandb's offline run files (`wandb sync` uploads those). TensorBoard logs go along: the
# Hub shows them in the repository's "Training metrics" tab.
UPLOAD_IGNORE = ["checkpoints/*", "wandb/*", "*.tmp*"]
WEIGHT_FILES = ["model*.safetensors", "model.safetensors.index.json", "pytorch_model*"]  # replaced on upload


def check_can_push():
    """--push_to_hub stops here, before any work, when the upload at the end cannot succeed."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        raise UserError("--push_to_hub needs the network but HF_HUB_OFFLINE is set: unset it, or drop "
                        "--push_to_hub and upload later with `hf upload REPO_ID OUTPUT_DIR`")
    if not get_token():
        raise UserError("--push_to_hub needs a Hugging Face token and none was found: run `hf auth login` "
                        "or set HF_TOKEN, or drop --push_to_hub")


def set_generation_ids(model, tokenizer):
    """Give generation_config.json the tokenizer's BOS / EOS / padding ids where the model has none
    (a pretrained GPT-2 has no padding id), so generate() and pipelines stop at EOS and pad quietly."""
    generation = model.generation_config
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(generation, name) is None:
            setattr(generation, name, getattr(tokenizer, name))


def write_model_card(output_dir, repo_id=None):
    """OUTPUT_DIR/README.md: Hub metadata, what was trained on what, final metrics, usage, full config."""
    run = load_run(output_dir)
    config = run.config or {}
    with open(os.path.join(output_dir, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    base_model = config.get("model_name_or_path")
    metadata = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation",
        tags=[t for t in ("clm-train", "causal-lm", model_type, "text-generation") if t],
        base_model=base_model if base_model and not os.path.isdir(base_model) else None,  # only a Hub name
        datasets=[s["name"] for s in config.get("sources") or [] if s.get("kind") == "hub"] or None)
    results = run.results or {}
    origin = f"continued from `{base_model}`" if base_model else "trained from scratch"
    parameters = f"{millions(results['parameters'])}-parameter " if results.get("parameters") else ""
    load_from = repo_id or os.path.abspath(output_dir)
    flags = {k: v for k, v in config.items() if k not in ("debug", "config")}
    plot = [f"![Loss]({p})" for p in ("plots/loss.png",) if os.path.isfile(os.path.join(output_dir, p))]
    body = "\n".join([
        f"# {run.name}", "",
        f"A {parameters}{model_type or 'causal'} language model, {origin} on {describe_data(config)} with "
        f"clm-train (`train.py`, Hugging Face Accelerate): {results.get('steps', '?')} optimizer steps, "
        f"{results.get('train_tokens', 0):,} tokens.", "",
        "## Results", "", metrics_table(run), "",
        "## Use it", "", "```python", "from transformers import pipeline", "",
        f'generator = pipeline("text-generation", model="{load_from}")',
        'print(generator("The", max_new_tokens=50, do_sample=True, top_k=50)[0]["generated_text"])', "```", "",
        "## Training", "", f"Batch: {batch_math(run)}.", "",
        config_table(run), "", *plot, "",
        "<details><summary>All training flags</summary>", "", "```yaml",
        yaml.safe_dump(flags, sort_keys=False).rstrip(), "```", "", "</details>", ""])
    card = ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{body}")
    card.save(os.path.join(output_dir, "README.md"))
    return card


def push_to_hub(output_dir, repo_id, api=None):
    """Create the repository if needed and upload OUTPUT_DIR (not its checkpoints); returns the repo URL."""
    api = api or HfApi()
    try:
        url = api.create_repo(repo_id, exist_ok=True)
        write_model_card(output_dir, url.repo_id)  # its usage example now names the full repository id
        api.upload_folder(repo_id=url.repo_id, folder_path=output_dir, ignore_patterns=UPLOAD_IGNORE,
                          delete_patterns=WEIGHT_FILES,  # an earlier upload's weights would load instead of these
                          commit_message="Upload model trained with clm-train")
    except Exception as e:  # network, authentication and permission errors each have their own type
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"upload of {output_dir} to the Hub repository {repo_id} failed ({type(e).__name__}: "
                        f"{reason}): the run is saved; retry with `hf upload {repo_id} {output_dir}`") from e
    return url
