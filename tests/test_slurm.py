"""slurm/train.sbatch under real SLURM daemons: a one-node, CPU-only cluster (munge, slurmctld,
slurmd from Debian's slurm-wlm) started by this test. The job trains and writes results.json; a job
signalled with SIGTERM, as `--signal=TERM@300` does near the time limit, ends with a checkpoint;
a second job with `--resume_from_checkpoint latest` finishes it.

Run alone with `python -m pytest -m slurm`. Installs slurm-wlm with apt-get when it is missing.
"""

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, train_losses

pytestmark = pytest.mark.slurm
RUN = [*TINY, "--max_train_steps", 40, "--checkpointing_steps", 10, "--eval_steps", 1000, "--num_warmup_steps", 3,
       "--global_batch_size", 8]


def _install():
    if shutil.which("slurmctld") and shutil.which("munged"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "SLURM is not installed and cannot be (needs root and apt-get for Debian's slurm-wlm)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if result.returncode != 0 and cmd[1] == "install":
            return f"apt-get install slurm-wlm munge failed: {result.stderr.strip().splitlines()[-1:]}"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node SLURM cluster on this machine; yields the environment that points at it."""
    reason = _install()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "munge"):
        (base / sub).mkdir()
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    subprocess.run(["mkdir", "-p", "/run/munge"], check=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force"], check=False, capture_output=True)
    host, cpus = socket.gethostname(), len(os.sched_getaffinity(0))
    conf = base / "slurm.conf"
    conf.write_text(f"""ClusterName=clmtest
SlurmctldHost={host}
SlurmUser=root
SlurmctldPort=6917
SlurmdPort=6918
AuthType=auth/munge
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True)
    subprocess.run(["slurmd", "-f", str(conf)], env=env, check=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()
        if state in ("idle", "mixed"):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the SLURM node never became idle (state {state!r}):\n{(base / 'slurmctld.log').read_text()[-3000:]}")
    yield env
    for pid_file in ("slurmd.pid", "slurmctld.pid"):
        try:
            os.kill(int((base / pid_file).read_text()), 15)
        except (OSError, ValueError):
            pass


def sbatch(env, tmp_path, name, args, wait=True):
    """Submit slurm/train.sbatch as a user of a CPU cluster would: GPU directives overridden."""
    log = tmp_path / f"{name}.out"
    cmd = ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={len(os.sched_getaffinity(0))}",
           f"--output={log}", "--export=ALL,CONFIG=accelerate_configs/multi_node_ddp.yaml,GPUS_PER_NODE=2,"
           f"MAIN_PORT={29000 + os.getpid() % 500},LAUNCH_ARGS=--mixed_precision no",
           *(["--wait"] if wait else []), "slurm/train.sbatch", *map(str, args)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 or not wait, f"sbatch failed: {result.stderr}\n{log.read_text()[-5000:] if log.exists() else ''}"
    return result.stdout.strip().split(";")[0], log


def test_sbatch_trains_is_preempted_and_resumes(cluster, tmp_path, corpus):
    # 1. A whole job: trains with 2 processes and writes results.json.
    full = tmp_path / "full"
    job, log = sbatch(cluster, tmp_path, "full", ["--train_file", corpus, "--output_dir", full, *RUN])
    res = json.loads((full / "results.json").read_text())
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], env=cluster, capture_output=True, text=True).stdout
    assert " ExitCode=0:0 " in f" {shown} ", shown
    assert (res["num_processes"], res["distributed_type"], res["mixed_precision"]) == (2, "MULTI_CPU", "no"), \
        log.read_text()[-3000:]

    # 2. A job signalled near its "time limit": every process of the step gets SIGTERM.
    out = tmp_path / "preempted"
    args = ["--train_file", corpus, "--output_dir", out, *RUN, "--resume_from_checkpoint", "latest"]
    job, log = sbatch(cluster, tmp_path, "preempted", args, wait=False)
    deadline = time.time() + 600
    while time.time() < deadline and (not (out / "metrics.jsonl").exists() or max(train_losses(out), default=0) < 13):
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=TERM", job], env=cluster, check=True)  # all steps' processes, as --signal
    while subprocess.run(["squeue", "-h", "-j", job], env=cluster, capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline + 300, "the signalled job did not end"
        time.sleep(0.5)
    text = log.read_text()
    assert "SIGTERM received: saved" in text, text[-5000:]
    # the job says what happened: stopped on a signal after saving, requeue it (the launcher alone says 1)
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], env=cluster, capture_output=True, text=True).stdout
    assert " ExitCode=75:0 " in f" {shown} ", shown
    assert "SignalException" not in text  # torchrun's agent left SIGTERM alone
    step = int(text.split("SIGTERM received: saved")[1].split("after step ")[1].split(";")[0])
    assert step > 10 and (out / "checkpoints" / f"step_{step}" / "trainer_state.json").is_file()

    # 3. The same command again continues from there and finishes with the whole job's losses.
    _, log = sbatch(cluster, tmp_path, "resumed", args)
    assert f"resumed from {out / 'checkpoints' / f'step_{step}'}" in log.read_text()
    losses, expected = train_losses(out), train_losses(full)
    assert sorted(losses) == sorted(expected)
    assert max(abs(losses[s] - expected[s]) for s in expected) < 1e-5
