"""What a run leaves behind: tracker logs, report, Hub-ready model folder; and the tools that read it
(generation CLI, --eval_only, python report.py). One shared tiny run keeps this file fast."""

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT, TINY, launch, read_metrics, results
from utils.config import parse_args
from utils.errors import UserError

RUN_NAME = "tiny-outputs"
# What every tracker must receive under the same names (mfu because the run gives --peak_flops)
METRICS = {"loss", "lr", "grad_norm", "tokens_per_second", "mfu", "peak_memory_gib", "eval_loss", "perplexity"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("outputs") / "out"
    done = launch(["--train_file", corpus, "--output_dir", out, *TINY, "--max_train_steps", 12, "--eval_steps", 6,
                   "--checkpointing_steps", 6, "--report_to", "all", "--run_name", RUN_NAME, "--peak_flops", 1e12])
    (out.parent / "stdout.txt").write_text(done.stdout)  # a pipe, as under SLURM or nohup
    return out


def python(*args, env=None):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def assert_one_line_error(result, message):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, result.stderr[-2000:]


def test_output_to_a_file_is_one_plain_line_per_logging_step(run):
    """Not a terminal: no progress bar redrawn with carriage returns (53 KB on one line for the default
    job), but a line a log file keeps per logging step: step, loss, lr, tokens/s, ETA."""
    stdout = (run.parent / "stdout.txt").read_text()
    assert "\r" not in stdout
    lines = [line for line in stdout.splitlines() if line.startswith("step ") and "tokens/s" in line]
    assert [line.split(" | ")[0] for line in lines] == [f"step {i}/12" for i in range(1, 13)]
    logged = {r["step"]: r for r in read_metrics(run) if "loss" in r}
    for line in lines:
        step, loss, lr, speed, eta = line.split(" | ")
        record = logged[int(step.split()[1].split("/")[0])]
        assert float(loss.split()[1]) == pytest.approx(record["loss"], abs=1e-4)
        assert float(lr.split()[1]) == pytest.approx(record["lr"], rel=1e-3)
        assert speed.endswith(" tokens/s") and eta.startswith("ETA ")
    assert lines[-1].endswith("ETA 0:00:00")


# --- Trackers ----------------------------------------------------------------------------------

def tensorboard_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def wandb_records(path):
    """The protobuf records of an offline run file (LevelDB log format: 32 KiB blocks of chunks,
    each with a 7-byte header; FULL=1 or FIRST=2, MIDDLE=3, LAST=4) after its 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending = Path(path).read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # too little room left in the block for a header: padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_tensorboard_logs_every_metric_under_output_dir(run):
    scalars = tensorboard_scalars(run / "tensorboard" / RUN_NAME)
    assert METRICS <= set(scalars)
    records = read_metrics(run)
    logged = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(scalars["loss"]) == list(range(1, 13))
    assert all(scalars["loss"][s] == pytest.approx(logged[s], rel=1e-6) for s in logged)
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert sorted(scalars["eval_loss"]) == [0, 6, 12]
    assert all(scalars["eval_loss"][s] == pytest.approx(evals[s], rel=1e-6) for s in evals)
    hparams = next((run / "tensorboard" / RUN_NAME).glob("*/hparams.yml")).read_text()
    assert "learning_rate: 0.003" in hparams and f"run_name: {RUN_NAME}" in hparams  # the run config


def test_wandb_runs_offline_into_output_dir_with_the_same_metrics(run):
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1 and (runs[0] / "logs" / "debug.log").exists()
    records = list(wandb_records(files[0]))
    header = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (header.display_name, header.project) == (RUN_NAME, "clm-training")
    config = {u.key for r in records if r.WhichOneof("record_type") == "config" for u in r.config.update}
    assert {"learning_rate", "block_size", "run_name", "world_size"} <= config
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            history.setdefault(items["_step"], {}).update(items)
    names = {k for step in history.values() for k in step if not k.startswith("_")}
    assert names == set(tensorboard_scalars(run / "tensorboard" / RUN_NAME))  # both trackers, same names
    assert METRICS <= names
    assert history[12]["eval_loss"] == pytest.approx(results(run)["eval_loss"], rel=1e-6)


def test_run_name_defaults_to_the_output_directory_name(tmp_path):
    assert parse_args(["--output_dir", str(tmp_path / "exp-7") + "/"]).run_name == "exp-7"
    assert parse_args(["--output_dir", str(tmp_path), "--run_name", "mine"]).run_name == "mine"


def test_wandb_without_a_key_or_login_runs_offline(tmp_path):
    """The runs above force WANDB_MODE=offline; here the fallback itself, with no key and an empty netrc."""
    from utils.metrics import tracker_init_kwargs

    netrc = tmp_path / "netrc"
    netrc.write_text("")
    kwargs = tracker_init_kwargs(tmp_path / "out", "r", env={"NETRC": str(netrc)})["wandb"]
    assert kwargs == {"name": "r", "dir": str(tmp_path / "out"), "mode": "offline"}
    assert "mode" not in tracker_init_kwargs(tmp_path, "r", env={"NETRC": str(netrc), "WANDB_API_KEY": "k"})["wandb"]
    netrc.write_text("machine api.wandb.ai\n  login user\n  password k\n")  # `wandb login`
    assert "mode" not in tracker_init_kwargs(tmp_path, "r", env={"NETRC": str(netrc)})["wandb"]
    chosen = {"NETRC": str(tmp_path / "none"), "WANDB_MODE": "online"}  # the user's own mode is kept
    assert "mode" not in tracker_init_kwargs(tmp_path, "r", env=chosen)["wandb"]


# --- Report ------------------------------------------------------------------------------------

def assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_report_summarizes_a_finished_run(run):
    report, res = (run / "report.md").read_text(), results(run)
    assert f"# Training report: {RUN_NAME}" in report
    assert "finished: 12 steps" in report
    assert f"{res['initial_perplexity']:.1f} → {res['perplexity']:.1f}" in report
    assert f"{res['initial_eval_loss']:.4f} → {res['eval_loss']:.4f}" in report
    assert "4 micro-batch x 1 accumulation x 1 process = 4 sequences x 32 tokens = 128 tokens per optimizer step" in report
    assert f"| tokens trained | {res['train_tokens']:,} |" in report and "tokens/s" in report and "| MFU |" in report
    assert "preset 'tiny'" in report and "lr 0.003" in report
    for plot in ("loss", "lr", "tokens_per_second"):
        assert f"(plots/{plot}.png)" in report
        assert_png(run / "plots" / f"{plot}.png")


def test_report_on_an_unfinished_run(run, tmp_path):
    """A run stopped (or still going) after step 8: no results.json, a checkpoint at step 6, and a
    metrics.jsonl whose last line is half written."""
    partial = tmp_path / "partial"
    (partial / "checkpoints" / "step_6").mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "step_6" / "trainer_state.json", partial / "checkpoints" / "step_6")
    lines = [line for line in (run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 8]
    (partial / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 9, "lo')
    result = python("report.py", partial)
    assert result.returncode == 0, result.stderr[-2000:]
    report = (partial / "report.md").read_text()
    assert "running or stopped (no results.json yet): step 8 of 12" in report
    assert "last checkpoint at step 6" in report
    assert "| eval loss (step 6) |" in report and "| last training loss |" in report
    assert "4 sequences x 32 tokens = 128 tokens per optimizer step" in report  # from the checkpoint
    assert "preset 'tiny'" in report  # the config, from the checkpoint's trainer_state.json
    for plot in ("loss", "lr", "tokens_per_second"):
        assert_png(partial / "plots" / f"{plot}.png")
    assert_one_line_error(python("report.py", tmp_path / "missing"), "is not a directory")


# --- Generation --------------------------------------------------------------------------------

def test_generate_cli_samples_from_the_output_dir(run):
    result = python("generate.py", "--model", run, "--prompt", "The", "--max_new_tokens", 6,
                    "--num_samples", 2, "--seed", 3, "--top_p", 0.9)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "--- sample 1 ---" and "--- sample 2 ---" in lines
    samples = result.stdout.split("--- sample 2 ---")
    assert samples[0].split("\n", 1)[1].startswith("The") and samples[1].lstrip("\n").startswith("The")


def test_generate_from_a_checkpoint_directory(run, tmp_path):
    """A checkpoint carries accelerate's model.safetensors with the model's config.json and tokenizer,
    so it loads on its own (copied elsewhere) as well as in its run."""
    from utils.generate import generate, load_model_and_tokenizer

    def greedy(model_dir):
        return generate(*load_model_and_tokenizer(str(model_dir)), "The", max_new_tokens=8, temperature=0)

    final = greedy(run)
    assert final[0].startswith("The") and len(final[0]) > 3
    assert greedy(run / "checkpoints" / "step_12") == final  # the last checkpoint has the final weights
    alone = shutil.copytree(run / "checkpoints" / "step_12", tmp_path / "step_12")
    assert (alone / "config.json").is_file() and (alone / "tokenizer.json").is_file()
    assert greedy(alone) == final
    model, tokenizer = load_model_and_tokenizer(str(run / "checkpoints" / "step_6"))
    sampled = generate(model, tokenizer, "The", max_new_tokens=8, seed=5, num_samples=2)
    assert sampled == generate(model, tokenizer, "The", max_new_tokens=8, seed=5, num_samples=2)  # seeded


def test_generate_bad_model_path_is_one_clear_error(tmp_path):
    assert_one_line_error(python("generate.py", "--model", tmp_path / "missing"), "does not exist")
    assert_one_line_error(python("generate.py", "--model", tmp_path), "holds no model")


# --- Evaluation only ---------------------------------------------------------------------------

def test_eval_only_reproduces_the_training_eval_loss(run, corpus, tmp_path):
    out = tmp_path / "eval"
    result = launch(["--train_file", corpus, "--output_dir", out, *TINY, "--eval_only", "--model_name_or_path", run])
    measured = json.loads((out / "eval_results.json").read_text())
    assert measured["eval_loss"] == pytest.approx(results(run)["eval_loss"], abs=1e-4)
    assert measured["perplexity"] == pytest.approx(math.exp(measured["eval_loss"]))
    assert measured["eval_tokens"] > 0 and measured["eval_tokens"] % 32 == 0
    assert os.listdir(out) == ["eval_results.json"]  # nothing trained, saved or logged
    assert "eval loss" in result.stdout


def test_eval_only_needs_a_model():
    with pytest.raises(UserError, match="--eval_only needs the model to measure"):
        parse_args(["--eval_only"])


# --- The output directory as a Hub model repository ----------------------------------------------

def test_output_dir_is_a_hub_model_repo(run):
    from huggingface_hub import ModelCard
    from transformers import AutoTokenizer

    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "README.md"} <= set(os.listdir(run))
    generation = json.loads((run / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(run)
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    card, res = ModelCard.load(run / "README.md"), results(run)
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", "text-generation")
    assert {"clm-train", "llama"} <= set(card.data.tags)
    assert f"{res['initial_eval_loss']:.4f} → {res['eval_loss']:.4f}" in card.text  # final metrics
    assert "learning_rate: 0.003" in card.text and "max_train_steps: 12" in card.text  # training config
    assert "pipeline(\"text-generation\"" in card.text
    assert res["config"]["run_name"] == RUN_NAME


def test_generation_ids_come_from_the_tokenizer_where_missing():
    from transformers import GenerationConfig

    from utils.hub import set_generation_ids

    model = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=7))
    set_generation_ids(model, SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=2))
    generation = model.generation_config
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 7, 2)


def test_push_to_hub_offline_fails_early_and_leaves_output_untouched(run, corpus):
    def snapshot():
        return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")}

    before = snapshot()
    result = python("train.py", "--train_file", corpus, "--output_dir", run, "--push_to_hub", "--hub_model_id",
                    "me/tiny", env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(result, "--push_to_hub needs the network but HF_HUB_OFFLINE is set")
    assert snapshot() == before


def test_push_to_hub_without_a_token_fails_early(monkeypatch, tmp_path):
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match="needs a Hugging Face token"):
        parse_args(["--push_to_hub", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


class FakeHub:
    """Records what push_to_hub asks of the Hub API."""

    def __init__(self, fail=False):
        self.fail, self.uploads = fail, []

    def create_repo(self, repo_id, exist_ok):
        if self.fail:
            raise ConnectionError("no route to host\nmore detail")
        assert exist_ok
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def upload_folder(self, **kwargs):
        self.uploads.append(kwargs)


def test_push_to_hub_uploads_the_model_folder_without_training_state(run, tmp_path):
    from huggingface_hub.utils import filter_repo_objects

    from utils.hub import push_to_hub

    folder = shutil.copytree(run, tmp_path / "run")
    hub = FakeHub()
    push_to_hub(str(folder), "tiny", api=hub)
    (upload,) = hub.uploads
    assert upload["repo_id"] == "me/tiny" and upload["folder_path"] == str(folder)
    files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    uploaded = set(filter_repo_objects(files, ignore_patterns=upload["ignore_patterns"]))
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "report.md", "plots/loss.png"} <= uploaded
    assert not any(f.startswith(("checkpoints/", "wandb/")) for f in uploaded)
    assert any(f.startswith("tensorboard/") for f in uploaded)  # the Hub shows TensorBoard logs
    assert 'model="me/tiny"' in (folder / "README.md").read_text()  # the card names the full repository id
    with pytest.raises(UserError, match=r"ConnectionError: no route to host\): the run is saved; retry with `hf upload"):
        push_to_hub(str(folder), "me/tiny", api=FakeHub(fail=True))
