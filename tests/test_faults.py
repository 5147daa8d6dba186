"""Never lose a run: SIGKILL anywhere, SIGTERM, non-finite steps, and bad input that stops early."""

import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT, TINY, _ports, train_losses

# Long enough to be interrupted several times, short enough to finish in seconds.
RUN = [*TINY, "--max_train_steps", 150, "--checkpointing_steps", 10, "--checkpoints_total_limit", 2,
       "--eval_steps", 1000, "--num_warmup_steps", 5]


def start(args):
    """`python train.py ARGS`: one process, so signals reach the trainer itself."""
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(args, timeout=300):
    process = start(args)
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def wait_for(condition, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if condition():
            return True
        time.sleep(0.005)
    return False


def logged_steps(out):
    path = Path(out) / "metrics.jsonl"
    try:
        return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]
    except (OSError, ValueError):
        return []


def weights(out):
    return load_file(str(Path(out) / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    code, _, err = run(["--train_file", corpus, "--output_dir", out, *RUN])
    assert code == 0, err[-3000:]
    return out


def assert_same_run(out, reference):
    assert train_losses(out) == train_losses(reference)
    ours, theirs = weights(out), weights(reference)
    assert ours.keys() == theirs.keys()
    assert all((ours[k] == theirs[k]).all() for k in ours), "final weights differ from the uninterrupted run"


def test_sigkill_anywhere_then_resume_gives_the_same_weights(tmp_path, corpus, reference):
    out = tmp_path / "killed"
    args = ["--train_file", corpus, "--output_dir", out, *RUN, "--resume_from_checkpoint", "latest"]
    rng = random.Random(0)
    interrupted = 0
    for attempt in range(4):
        process = start(args)
        if attempt == 1:  # in the middle of writing a checkpoint
            ckpts = out / "checkpoints"
            wait_for(lambda: ckpts.is_dir() and any(p.suffix == ".tmp" for p in ckpts.iterdir()), process)
        else:  # at a random moment of training
            target = max(logged_steps(out), default=0) + rng.randint(3, 25)
            wait_for(lambda: max(logged_steps(out), default=0) >= target, process)
            time.sleep(rng.random() * 0.05)
        process.kill()
        process.communicate()
        interrupted += process.returncode == -signal.SIGKILL
    assert interrupted >= 3
    code, out_text, err = run(args)
    assert code == 0, err[-3000:]
    assert "resumed from" in out_text + err
    assert not [p for p in (out / "checkpoints").iterdir() if p.suffix == ".tmp"]
    assert_same_run(out, reference)


def test_sigterm_saves_a_checkpoint_and_exits_75(tmp_path, corpus, reference):
    out = tmp_path / "preempted"
    args = ["--train_file", corpus, "--output_dir", out, *RUN, "--resume_from_checkpoint", "latest"]
    process = start(args)
    assert wait_for(lambda: max(logged_steps(out), default=0) >= 13, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-3000:]
    step = max(logged_steps(out))
    assert f"SIGTERM received: saved {out / 'checkpoints' / f'step_{step}'} after step {step}" in stdout + stderr
    assert (out / "checkpoints" / f"step_{step}" / "trainer_state.json").is_file()
    code, _, err = run(args)
    assert code == 0, err[-3000:]
    assert_same_run(out, reference)


def start_with(args, env):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


@pytest.mark.parametrize("seconds_left, saves", [(30, False)])
def test_a_save_that_cannot_end_before_the_job_does_is_not_started(seconds_left, saves, tmp_path, corpus):
    """The job ends at JOB_END_TIME (slurm/train.sbatch exports it): with 30 s left, less than the slowest
    save so far plus the 60 s margin, the stop saves nothing (a save the scheduler kills half-way is
    lost work and a torn directory) and says so. Exit 75 and the exit-status file. (With time left, or
    none known, it saves: test_sigterm_saves_a_checkpoint_and_exits_75.)"""
    out, status = tmp_path / "out", tmp_path / "status"
    process = start_with(["--train_file", corpus, "--output_dir", out, *RUN],
                         {"JOB_END_TIME": str(time.time() + seconds_left), "EXIT_STATUS_FILE": str(status)})
    assert wait_for(lambda: max(logged_steps(out), default=0) >= 13, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 75 and status.read_text() == "75\n", stderr[-3000:]
    step = max(logged_steps(out))
    saved = (out / "checkpoints" / f"step_{step}").is_dir()
    assert saved == saves and (out / "checkpoints" / "step_10").is_dir()  # the regular one, measured
    if not saves:
        assert f"SIGTERM received after step {step}: a save takes up to" in stdout
        assert "so none was started" in stdout


def test_the_exit_status_file_says_what_happened(tmp_path, monkeypatch, capsys):
    """run_cli writes the code a script ends with, however it ends, on the job's first process only."""
    from utils.errors import UserError, run_cli
    from utils.faults import TrainingDiverged

    status = tmp_path / "status"
    monkeypatch.setenv("EXIT_STATUS_FILE", str(status))

    def ends(how):
        def main(argv):
            if isinstance(how, BaseException):
                raise how
            return how
        with pytest.raises(SystemExit) as done:
            run_cli(main)
        return done.value.code, status.read_text()
    assert ends(0) == (0, "0\n")
    assert ends(UserError("bad input")) == (2, "2\n")
    assert ends(TrainingDiverged("diverged")) == (3, "3\n")
    assert ends(SystemExit(75)) == (75, "75\n")  # save_and_exit after a signal
    with pytest.raises(RuntimeError):
        run_cli(lambda argv: (_ for _ in ()).throw(RuntimeError("crash")))
    assert status.read_text() == "1\n"
    status.unlink()
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        run_cli(lambda argv: 0)
    assert not status.exists()  # the job's first process writes it, no other


def test_time_left_is_the_nearest_known_end(monkeypatch):
    from utils.faults import StopSignal

    monkeypatch.setattr(signal, "signal", lambda *args: None)  # leave pytest's own handlers alone
    now = time.time()
    assert StopSignal(env={}).time_left() == math.inf  # outside a scheduler: always save
    assert StopSignal(env={"JOB_END_TIME": str(now + 100)}).time_left() == pytest.approx(100, abs=5)
    stop = StopSignal(env={"JOB_END_TIME": str(now + 100), "PREEMPT_GRACE_SECONDS": "30"})
    assert stop.time_left() == pytest.approx(100, abs=5)  # no signal yet: the grace time has not started
    stop.received_at = now
    assert stop.time_left() == pytest.approx(30, abs=5)
    assert StopSignal(env={"JOB_END_TIME": str(now - 3600)}).time_left() == math.inf  # broken: ignored


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, corpus):
    out = tmp_path / "diverged"
    code, _, err = run(["--train_file", corpus, "--output_dir", out, *TINY, "--max_train_steps", 50,
                        "--learning_rate", "1e30", "--num_warmup_steps", 0, "--max_nonfinite_steps", 3])
    assert code == 3
    assert "consecutive steps with non-finite loss or gradients" in err.strip().splitlines()[-1]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    counts = [r["nonfinite_steps"] for r in records if "nonfinite_steps" in r]
    assert counts[-2:] == [1, 2]  # skipped and counted, training went on, then the third stopped it
    assert not (out / "model.safetensors").exists()  # nothing saved from a diverged run


def test_repeated_sigterm_only_asks_again():
    """SLURM signals every process of the step and torchrun's agent forwards its own SIGTERM again:
    the second SIGTERM must not kill a worker that is saving."""
    code = ("import os, signal, sys, time; sys.path.insert(0, sys.argv[1]); from utils.faults import StopSignal; "
            "s = StopSignal(); [os.kill(os.getpid(), signal.SIGTERM) for _ in range(3)]; time.sleep(0.2); "
            "print(s.received)")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, "SIGTERM")


def test_the_stop_agreement_waits_as_long_as_the_other_collectives():
    """Its background gloo group gets --ddp_timeout, not gloo's own 30 minutes."""
    code = ("import os, sys, types, torch; sys.path.insert(0, sys.argv[1]); from utils.faults import StopSignal; "
            "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=sys.argv[2]); "
            "torch.distributed.init_process_group('gloo', rank=0, world_size=1); s = StopSignal(7200); "
            "s.agreed(types.SimpleNamespace(num_processes=2)); s.close(); "
            "print(s._group._get_backend(torch.device('cpu')).options._timeout.total_seconds())")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT), str(next(_ports))], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == "7200.0", result.stderr[-2000:]


def test_second_ctrl_c_aborts():
    code = ("import os, signal, sys, time; sys.path.insert(0, sys.argv[1]); from utils.faults import StopSignal; "
            "s = StopSignal(); os.kill(os.getpid(), signal.SIGINT); time.sleep(0.1); print(s.received, flush=True); "
            "os.kill(os.getpid(), signal.SIGINT); time.sleep(1); print('still running')")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines() == ["SIGINT"] and "KeyboardInterrupt" in result.stderr


# --- fp16 loss scaling: overflows belong to the scaler, not to the divergence guard ---

def fp16_steps(scale_factors, limit=3, init_scale=2.0**16):
    """A GradScaler-driven loop on CPU, as accelerate runs fp16 on a GPU: scale the loss, backward,
    unscale and clip (accelerator.clip_grad_norm_), then the guard's step. A factor of inf makes the
    gradients overflow."""
    import torch
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from utils.faults import NonFiniteGuard

    Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    optimizer = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), scaler=scaler)
    guard = NonFiniteGuard(limit, loss_scaling=True, scaler=scaler)
    weights = []
    for step, factor in enumerate(scale_factors, 1):
        loss = model(torch.ones(2, 4)).sum() * factor
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        guard.record(guard.step(optimizer, grad_norm), step)
        optimizer.zero_grad()
        weights.append(model.weight.detach().clone())
    return guard, scaler, weights


def test_fp16_overflow_is_skipped_by_the_scaler_and_training_goes_on():
    """Skipping optimizer.step() on an overflow also skipped the scaler's update, and the next
    unscale_ raised 'unscale_() has already been called'. Now the scaler skips, halves its scale, and
    its skips (loss-scale calibration) are not counted as divergence."""
    inf = float("inf")
    guard, scaler, weights = fp16_steps([1.0, inf, inf, inf, inf, 1.0])
    assert guard.total == 0 and guard.loss_scale_skips == 4
    assert scaler.get_scale() == 2.0**16 / 2**4
    assert all((weights[i] == weights[0]).all() for i in range(1, 5))  # the overflowing steps changed nothing
    assert not (weights[5] == weights[4]).all()  # the next finite step trains


def test_fp16_overflow_at_a_tiny_scale_is_divergence():
    """Below a scale of 1 the scaler is no longer calibrating: the inf/NaN values are real."""
    from utils.faults import TrainingDiverged

    with pytest.raises(TrainingDiverged):
        fp16_steps([float("nan")] * 5, limit=3, init_scale=2.0)
    guard, _, _ = fp16_steps([float("nan")] * 5, limit=0, init_scale=2.0)  # --max_nonfinite_steps 0: off
    assert guard.total == 0


def test_deepspeed_fp16_overflow_is_not_divergence():
    """DeepSpeed skips an overflowing step inside its engine and reports an infinite grad norm."""
    from utils.faults import NonFiniteGuard

    class EngineOptimizer:  # accelerate's DeepSpeedOptimizerWrapper: step() is a no-op, overflow readable
        step_was_skipped = True

        def step(self):
            pass

    guard = NonFiniteGuard(3, loss_scaling=True, scaler=None)
    for step in range(1, 6):
        guard.record(guard.step(EngineOptimizer(), float("inf")), step)
    assert (guard.total, guard.loss_scale_skips) == (0, 5)


# --- Bad input: one line, a non-zero exit, before expensive work, output directory untouched ---

def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def existing_output(tmp_path):
    """An output directory holding an earlier run's files, which a failed start must not touch."""
    out = tmp_path / "out"
    (out / "checkpoints" / "step_5").mkdir(parents=True)
    (out / "checkpoints" / "step_5" / "trainer_state.json").write_text('{"step": 5, "samples_per_step": 4, '
                                                                     '"initial_eval_loss": 6.0}')
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 6.2}\n')
    (out / "model.safetensors").write_bytes(b"weights")
    return out


def write(path, text):
    path.write_text(text)
    return path


def bad_input_cases(tmp_path, corpus):
    tiny_text = write(tmp_path / "tiny.txt", "Just a few words.\n\nAnd a second paragraph.\n")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"\x00not parquet at all" * 10)
    bad_json = write(tmp_path / "bad.jsonl", '{"text": "fine"}\n{"text": "fine too"}\n{"text": broken\n')
    corrupt = tmp_path / "corrupt_ckpt"
    corrupt.mkdir()
    (corrupt / "trainer_state.json").write_text("{not json")
    bad_ds = write(tmp_path / "ds.json", "{ this is not json")
    return {
        "missing file": (["--train_file", tmp_path / "nope.jsonl"], {}, "does not exist"),
        "unreadable file": (["--train_file", garbage], {}, "cannot read"),
        "empty dataset": (["--train_file", write(tmp_path / "empty.jsonl", "")], {}, "empty"),
        "no text column": (["--train_file", write(tmp_path / "cols.jsonl", '{"a": 1, "b": 2}\n' * 50)], {},
                           "no text column 'text'"),
        "malformed json line": (["--train_file", bad_json], {}, "line 3 is not valid JSON"),
        "split too short": (["--train_file", tiny_text, "--block_size", 512], {}, "fewer than one block"),
        "unknown preset": (["--train_file", corpus, "--model_preset", "huge"], {}, "unknown --model_preset 'huge'"),
        "unknown flag": (["--train_file", corpus, "--learnig_rate", 1], {}, "unrecognized arguments: --learnig_rate"),
        "unknown recipe key": (["--config", write(tmp_path / "r.yaml", "lr: 1\n")], {}, "unknown key(s) lr"),
        "model offline": (["--train_file", corpus, "--model_name_or_path", "no-org/no-model"], {},
                          "cannot load model 'no-org/no-model'"),
        "tokenizer offline": (["--train_file", corpus, "--tokenizer_name", "no-org/no-tokenizer"], {},
                              "cannot load tokenizer 'no-org/no-tokenizer'"),
        "ds_config does not parse": (["--train_file", corpus], {"ACCELERATE_USE_DEEPSPEED": "true",
                                                               "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(bad_ds)},
                                     "cannot read DeepSpeed config"),
        "resume at nothing": (["--train_file", corpus, "--resume_from_checkpoint", tmp_path / "nothing"], {},
                              "is not a complete checkpoint"),
        "resume at corrupt": (["--train_file", corpus, "--resume_from_checkpoint", corrupt], {}, "is corrupt"),
        "output not writable": (["--train_file", corpus, "--output_dir", tiny_text / "sub"], {}, "is not writable"),
        "streaming without steps": (["--train_file", corpus, "--streaming"], {}, "--streaming needs --max_train_steps"),
        "streaming empty dataset": (["--train_file", write(tmp_path / "empty.jsonl", ""), "--streaming",
                                     "--max_train_steps", 2], {}, "is empty"),
        "streaming split too short": (["--train_file", tiny_text, "--streaming", "--max_train_steps", 2,
                                       "--block_size", 512], {}, "fewer than one block"),
    }


CASES = ["missing file", "unreadable file", "empty dataset", "no text column", "malformed json line",
         "split too short", "unknown preset", "unknown flag", "unknown recipe key", "model offline",
         "tokenizer offline", "ds_config does not parse", "resume at nothing", "resume at corrupt",
         "output not writable", "streaming without steps", "streaming empty dataset", "streaming split too short"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_line_and_touches_nothing(case, tmp_path, corpus, existing_output):
    argv, env, message = bad_input_cases(tmp_path, corpus)[case]
    if "--output_dir" not in argv:
        argv = [*argv, "--output_dir", existing_output]
    before = snapshot(existing_output)
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY[:2], *map(str, argv)], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert message in last and (last.startswith("error:") or "usage" in result.stderr)
    assert snapshot(existing_output) == before


def test_vocab_mismatch_between_tokenizer_and_model(tmp_path, corpus, existing_output):
    from transformers import LlamaConfig

    model_dir = tmp_path / "small-vocab-model"
    LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32).save_pretrained(model_dir)
    tokenizer_dir = tmp_path / "tokenizer"
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    bpe = Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)} | {"<eos>": 100}, unk_token="w0"))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>").save_pretrained(tokenizer_dir)
    before = snapshot(existing_output)
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--train_file", str(corpus), "--model_name_or_path",
                             str(model_dir), "--tokenizer_name", str(tokenizer_dir), "--output_dir", str(existing_output)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "has 64 token embeddings but the tokenizer has 101 tokens" in result.stderr.strip().splitlines()[-1]
    assert snapshot(existing_output) == before


def test_bad_data_found_while_reading_it_does_not_create_the_output_dir(tmp_path, corpus):
    """A split shorter than one block is only known once the text is tokenized: still one line, and a
    new --output_dir is not created."""
    out = tmp_path / "new_output"
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--train_file", str(corpus), "--vocab_size", "512",
                             "--block_size", "100000", "--output_dir", str(out)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "fewer than one block" in result.stderr.strip().splitlines()[-1]
    assert not out.exists()
