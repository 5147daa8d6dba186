"""Loss spikes handled without a human (utils/spikes.py, Checkpointer.rollback): an outlier step's
update is skipped, a sustained spike rolls back to the checkpoint before it and skips the data that led
into it, which neither a resume nor a second rollback reads again."""

import json
import random
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, launch, read_metrics, results, train_losses
from utils.spikes import SpikeDetector


def feed(detector, values, start=1):
    """(step, event) of each outlier among `values`, (loss, grad norm) per step."""
    events = []
    for step, (loss, norm) in enumerate(values, start):
        event = detector.check(step, torch.tensor(loss), torch.tensor(norm))
        if event:
            events.append((step, event["event"]))
    return events


def noisy(n, seed=0, loss=3.0, norm=1.0):
    rng = random.Random(seed)
    return [(loss + rng.gauss(0, 0.02), norm + rng.gauss(0, 0.05)) for _ in range(n)]


def test_an_outlier_is_decided_only_once_half_the_window_is_in():
    detector = SpikeDetector(sigma=6, window=20)
    assert feed(detector, noisy(9) + [(30.0, 1.0)]) == []  # step 10: 9 steps in the window, 10 needed
    detector = SpikeDetector(sigma=6, window=20)
    assert feed(detector, noisy(10) + [(30.0, 1.0)]) == [(11, "skipped")]


def test_loss_or_gradient_norm_above_sigma_is_an_outlier_and_below_the_mean_never():
    base = noisy(40)
    assert feed(SpikeDetector(window=40), base + [(3.0, 5.0)]) == [(41, "skipped")]  # the norm alone
    assert feed(SpikeDetector(window=40), base + [(3.5, 1.0)]) == [(41, "skipped")]  # the loss alone
    assert feed(SpikeDetector(window=40), base + [(3.05, 1.1)]) == []  # ~2 sigma: noise
    assert feed(SpikeDetector(window=40), base + [(0.5, 0.01)]) == []  # a drop is never a spike
    assert feed(SpikeDetector(window=40), base + [(float("nan"), 1.0)]) == []  # the non-finite guard's case


def test_loss_outliers_stay_out_of_the_window_so_a_lasting_spike_stays_one():
    detector = SpikeDetector(window=40, rollback_outliers=3, rollback_window=16)
    events = feed(detector, noisy(40) + [(6.0, 9.0)] * 5)
    assert events == [(s, "skipped") for s in range(41, 46)]
    assert detector.sustained and detector.outliers[0] == 41 and detector.skipped == 5


def test_the_gradient_norm_alone_skips_but_never_rolls_back_and_a_lasting_shift_becomes_normal():
    """Early in training the norm swings 10x on clean data while the loss falls (the tiny model at lr
    3e-3 did at steps 41-62): those updates are skipped, no rollback; a norm that stays 3x higher stops
    being an outlier once the window has taken it in."""
    detector = SpikeDetector(window=40, rollback_outliers=3, rollback_window=16)
    swings = feed(detector, noisy(40) + [(3.0, 15.0), (3.0, 1.0), (3.0, 18.0), (3.0, 12.0)])
    assert [step for step, _ in swings][:2] == [41, 43] and not detector.sustained and not detector.outliers
    detector = SpikeDetector(window=40)
    shifted = feed(detector, noisy(40) + noisy(80, seed=1, norm=3.0))
    assert shifted and max(step for step, _ in shifted) < 41 + 20


def test_isolated_outliers_never_add_up_to_a_rollback():
    detector = SpikeDetector(window=40, rollback_outliers=3, rollback_window=16)
    values = noisy(40)
    feed(detector, values)
    for k in range(6):  # one outlier every 10 steps: at most 2 within any 16
        values += noisy(9, seed=k + 1) + [(6.0, 9.0)]
        feed(detector, values[-10:], start=len(values) - 9)
        assert not detector.sustained
    assert detector.skipped == 6


def test_under_deepspeed_an_outlier_is_counted_as_applied():
    detector = SpikeDetector(window=40, can_skip=False)
    assert feed(detector, noisy(40) + [(6.0, 9.0)]) == [(41, "applied")]
    assert (detector.skipped, detector.applied) == (0, 1)


def test_the_state_round_trips_through_json_and_decides_the_same():
    values = noisy(60) + [(6.0, 9.0)] + noisy(10, seed=3)
    whole = SpikeDetector(window=40)
    first = feed(whole, values[:45])
    resumed = SpikeDetector(window=40)
    resumed.load_state_dict(json.loads(json.dumps(whole.state_dict())))
    assert feed(resumed, values[45:], start=46) == feed(whole, values[45:], start=46)
    assert resumed.state_dict() == whole.state_dict() and first == []


def test_a_flat_window_does_not_call_rounding_a_spike():
    assert feed(SpikeDetector(window=20), [(2.0, 1.0)] * 20 + [(2.0001, 1.0001)]) == []


def test_one_host_read_per_step_reads_a_float_norm_too():
    detector = SpikeDetector(window=8)
    for step in range(1, 4):
        detector.check(step, torch.tensor(1.0), 0.5)  # DeepSpeed's norm is a float
        detector.check(step, torch.tensor(1.0), None)
    assert len(detector.losses) == 6 and len(detector.norms) == 3


# --- Real launches: a poisoned stretch of data at a known position ------------------------------

SIGMA = 6.0
# Read in file order (one shuffle window), tiny model; the window is shorter than the default 128 so the
# check starts at step 16, and a checkpoint every 10 steps gives the rollback one from before the spike.
RUN = ["--streaming", "--stream_shuffle_blocks", 1, "--max_train_steps", 100, "--max_eval_samples", 8,
       "--checkpointing_steps", 10, "--spike_window", 32, "--eval_steps", 1000]
# A clean run's final eval loss moves by up to 0.12 with the seed alone (5.14, 5.27, 5.15 for seeds 42,
# 1, 2): a run that skipped the poison and ~5 steps of the data around it must land within 0.1 of the
# clean run of the same seed.
EVAL_TOLERANCE = 0.1


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The corpus in file order, and the same with two documents of random CJK characters after 12 KB of
    training text: ~3 steps of tokens the model has never seen (loss ~8.5 against ~5), around step 45.
    The first document is the validation split. Two stream parts (every other document) each hold one
    poison document after 6 KB: the same steps."""
    import pydoc_data.topics

    root = tmp_path_factory.mktemp("spikes")
    texts = sorted(pydoc_data.topics.topics.values())[:60]
    rng = random.Random(0)
    poison = ["".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(60)) for _ in range(2)]
    before, after = [texts[1], texts[0][:6000], texts[0][6000:12000]], [texts[0][12000:]] + texts[2:]
    for name, docs in (("clean", before + after), ("poisoned", before + poison + after)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return root


def events(out):
    return [r for r in read_metrics(out) if "event" in r]


@pytest.fixture(scope="module")
def runs(files, tmp_path_factory):
    """The poisoned file with spike handling, without it, and the clean file."""
    root = tmp_path_factory.mktemp("runs")
    for name, data, extra in (("spiky", "poisoned", []), ("off", "poisoned", ["--spike_sigma", 0]),
                              ("clean", "clean", [])):
        launch(["--train_file", files / f"{data}.jsonl", "--output_dir", root / name, *TINY, *RUN, *extra])
    return root


def poison_steps(runs):
    """The data steps that hold the poison: where the run that trained on it has a loss 1.5 above the clean run's."""
    off, clean = train_losses(runs / "off"), train_losses(runs / "clean")
    steps = [s for s in off if off[s] > clean[s] + 1.5]
    assert steps and max(steps) - min(steps) < 6, steps
    return set(steps)


def test_a_poisoned_stretch_is_skipped_then_rolled_back_and_never_trained_on(runs):
    out, poison = runs / "spiky", poison_steps(runs)
    found = events(out)
    rollbacks = [e for e in found if e["event"] == "rollback"]
    assert len(rollbacks) == 1, found
    rolled = rollbacks[0]
    first, last = rolled["data_steps_skipped"]
    assert rolled["checkpoint"] == f"step_{rolled['to_step']}" and rolled["to_step"] < min(rolled["outliers"])
    before = [e for e in found if e["event"] == "skipped" and e["step"] <= rolled["at_step"] and "data_step" in e]
    assert len(before) >= 3 and before[0]["step"] < rolled["at_step"]  # skipped first, then rolled back
    # every poisoned step of data was skipped: its update, or by the rollback
    skipped_updates = {e["data_step"] for e in found if e["event"] == "skipped"}
    assert poison <= set(range(first, last + 1)) | skipped_updates
    res = results(out)
    assert res["steps"] == 100
    assert res["spikes"]["rollbacks"] == [{k: v for k, v in r.items() if k not in ("step", "event")} for r in rollbacks]
    assert res["train_tokens"] == 100 * 4 * 32  # the model saw 100 steps' data; the skipped data is not counted
    assert res["sources"] is not None and res["sources"][0]["train_tokens"] == 100 * 4 * 32
    assert abs(res["eval_loss"] - results(runs / "clean")["eval_loss"]) < EVAL_TOLERANCE
    assert not list((out / "checkpoints").glob("*.old")) and (out / "checkpoints" / "step_100").is_dir()
    # the log: training records once per step (the rolled-back steps' records were replaced), the events kept
    assert sorted(train_losses(out)) == list(range(1, 101))
    report = (out / "report.md").read_text()
    assert "## Loss spikes" in report and f"back to {rolled['checkpoint']}" in report
    assert "rollback(s)" in report


def test_the_clean_run_only_skips_and_never_rolls_back(runs):
    assert all(e["event"] == "skipped" for e in events(runs / "clean"))
    assert not events(runs / "off") and results(runs / "off")["spikes"] is None


def test_a_kill_right_after_the_rollback_resumes_past_the_poison(runs, tmp_path, files):
    """The checkpoint it went back to now records the data position after the spike, and the checkpoints
    saved after it are gone: `--resume_from_checkpoint latest` right after the rollback trains exactly
    what the uninterrupted run did, and never reads the poison again."""
    import shutil

    out = tmp_path / "killed"
    shutil.copytree(runs / "spiky", out)
    rolled = [e for e in events(out) if e["event"] == "rollback"][0]
    target = out / "checkpoints" / rolled["checkpoint"]
    state = json.loads((target / "trainer_state.json").read_text())
    assert state["data_steps"] == rolled["data_steps_skipped"][1]
    assert state["rollbacks"] == [{k: v for k, v in rolled.items() if k not in ("step", "event")}]
    for path in (out / "checkpoints").iterdir():  # as if killed before the next save
        if path != target:
            shutil.rmtree(path)
    (out / "results.json").unlink()
    launch(["--train_file", files / "poisoned.jsonl", "--output_dir", out, *TINY, *RUN,
            "--resume_from_checkpoint", "latest"])
    uninterrupted, again = train_losses(runs / "spiky"), train_losses(out)
    assert [again[s] for s in range(rolled["to_step"] + 1, 101)] == \
        [uninterrupted[s] for s in range(rolled["to_step"] + 1, 101)]  # bit for bit on CPU
    assert results(out)["eval_loss"] == results(runs / "spiky")["eval_loss"]
    assert [e for e in events(out) if e["event"] == "rollback"] == [rolled]  # no second rollback


def train(args):
    """`python train.py ARGS`: the trainer's own exit code (accelerate's launcher turns every failure into 1)."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_too_many_rollbacks_stop_with_exit_code_3_and_keep_the_checkpoints(files, tmp_path):
    out = tmp_path / "stops"
    done = train(["--train_file", files / "poisoned.jsonl", "--output_dir", out, *TINY, *RUN, "--max_rollbacks", 0])
    assert done.returncode == 3, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "came back after 0 rollbacks (--max_rollbacks 0)" in last and "Traceback" not in done.stderr
    assert (out / "checkpoints" / "step_40").is_dir() and not (out / "model.safetensors").exists()


def test_no_checkpoint_before_the_spike_skips_its_updates_and_goes_on(files, tmp_path):
    """Spike handling is on by default and checkpoints are not: a sustained spike with nothing to roll
    back to skips its outliers' updates and the run finishes, as it did before there was a rollback."""
    out = tmp_path / "no_checkpoint"
    done = train(["--train_file", files / "poisoned.jsonl", "--output_dir", out, *TINY, *RUN, "--checkpointing_steps", 50])
    assert done.returncode == 0, done.stderr[-3000:]
    found = events(out)
    assert [e["event"] for e in found].count("not_rolled_back") >= 1 and "rollback" not in [e["event"] for e in found]
    assert "no checkpoint from before it" in done.stdout and results(out)["steps"] == 100


def test_rollbacks_count_per_spike_not_per_run():
    from utils.checkpoint import rollbacks_of_this_spike

    weeks_apart = [dict(at_step=1000, to_step=900), dict(at_step=50_000, to_step=49_900)]
    assert rollbacks_of_this_spike(weeks_apart, 90_000, window=128) == 0  # a new spike
    back_again = [dict(at_step=1000, to_step=900), dict(at_step=1010, to_step=900), dict(at_step=1005, to_step=900)]
    assert rollbacks_of_this_spike(back_again, 1020, window=128) == 3
    assert rollbacks_of_this_spike(back_again[1:], 5000, window=128) == 0


@pytest.mark.distributed
@pytest.mark.parametrize("config, distributed_type", [("multi_cpu.yaml", "MULTI_CPU"),
                                                      ("deepspeed_zero2.yaml", "DEEPSPEED")])
def test_two_processes_skip_roll_back_go_on_and_resume_past_the_poison(config, distributed_type, files, tmp_path):
    """Each process reads its own part of the stream (the poison is in one of them); both decide the
    same. Under DeepSpeed the engine has stepped inside backward, so an outlier's update is applied, not
    skipped, and the rollback undoes it with the rest."""
    import shutil

    out = tmp_path / "out"
    args = ["--train_file", files / "poisoned.jsonl", "--output_dir", out, *TINY, *RUN,
            "--per_device_train_batch_size", 2]  # 2 processes x 2 = the 4 sequences per step of one process
    launch(args, num_processes=2, config_file=config)
    res = results(out)
    assert (res["num_processes"], res["distributed_type"]) == (2, distributed_type)
    found = events(out)
    rollbacks = [i for i, e in enumerate(found) if e["event"] == "rollback"]
    assert rollbacks, found
    kind = "applied" if distributed_type == "DEEPSPEED" else "skipped"
    assert {e["event"] for e in found} == {kind, "rollback"}
    first, last = found[rollbacks[0]]["data_steps_skipped"]
    led_in = [e for e in found[:rollbacks[0]] if e["loss_z"] > SIGMA]
    assert len(led_in) == (2 if distributed_type == "DEEPSPEED" else 3) and {e["data_step"] for e in led_in} <= set(range(first, last + 1))
    assert res["steps"] == 100 and sorted(train_losses(out)) == list(range(1, 101))

    resumed = tmp_path / "resumed"  # killed right after the last rollback
    shutil.copytree(out, resumed)
    rolled = found[rollbacks[-1]]
    for path in (resumed / "checkpoints").iterdir():
        if path.name != rolled["checkpoint"]:
            shutil.rmtree(path)
    args[args.index("--output_dir") + 1] = resumed
    launch([*args, "--resume_from_checkpoint", "latest"], num_processes=2, config_file=config)
    before, again = train_losses(out), train_losses(resumed)
    assert max(abs(again[s] - before[s]) for s in range(rolled["to_step"] + 1, 101)) < 1e-6
    assert [e for e in events(resumed) if e["event"] == "rollback"] == [found[i] for i in rollbacks]


@pytest.mark.slow
def test_the_clean_default_job_has_no_spike(tmp_path):
    """The README's first command, spike handling on by default: nothing fires on clean data (489 steps,
    the check running from step 64 on)."""
    out = tmp_path / "default"
    launch(["--output_dir", out], timeout=1200)
    assert events(out) == []
    assert results(out)["spikes"] == {"skipped": 0, "applied": 0, "rollbacks": []}
