"""Files and directories that are either complete or absent: write under a temporary name, fsync,
rename. A reader (a resumed run, another rank, another node) never sees half of one, also after a
power loss, because the data reaches the disk before the rename that publishes it does."""

import errno
import os
import re
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path

from huggingface_hub.constants import HF_HOME

CACHE_ROOT = Path(HF_HOME) / "clm-train"  # this project's caches: corpus, tokenizers, token stores


_HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())


def temporary_name(path):
    """A sibling name for `path` that no other process writes to, on any host (containers on different
    nodes that share a filesystem often reuse the same PIDs; the random part covers containers that
    share a host name too)."""
    return f"{path}.tmp{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def write_atomic(path, data):
    """Write str or bytes to `path` in one step."""
    tmp = temporary_name(path)
    with open(tmp, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)
    return publish(tmp, path)


def publish(tmp, final, keep_existing=False):
    """Make the finished file or directory `tmp` appear as `final`, durably.

    keep_existing=True is for caches that several processes may fill at once (each node's main
    process, say): when another one published `final` first, its result counts and `tmp` is dropped.
    Otherwise `final` is replaced."""
    _fsync_tree(tmp)
    if keep_existing and os.path.exists(final):
        _remove(tmp)
        return final
    try:
        if os.path.isdir(tmp) and os.path.isdir(final) and not keep_existing:
            shutil.rmtree(final)  # a directory cannot be renamed onto a non-empty one
        os.replace(tmp, final)
    except OSError as e:
        if not (keep_existing and e.errno in (errno.ENOTEMPTY, errno.EEXIST) and os.path.exists(final)):
            raise
        _remove(tmp)  # a peer finished first
    _fsync(os.path.dirname(os.path.abspath(final)))  # the rename itself
    return final


def sync_filesystem(path):
    """Flush everything this node wrote to the filesystem holding `path` (Linux syncfs: that filesystem
    only; elsewhere sync), so files another process publishes by a rename are on disk on every node.
    Returns True once done."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            if libc.syncfs(fd) == 0:
                return True
        finally:
            os.close(fd)
    except (AttributeError, OSError):  # no syncfs (macOS): flush every filesystem
        pass
    os.sync()
    return True


def _fsync_tree(path):
    if os.path.isdir(path):
        for root, _, files in os.walk(path):
            for name in files:
                _fsync(os.path.join(root, name))
            _fsync(root)
    else:
        _fsync(path)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a directory; the data files are synced anyway
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EISDIR):
            raise
    finally:
        os.close(fd)


def _remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.remove(path)


def wait_for(paths, what, poll_seconds=1.0, report_seconds=300.0):
    """Return once every file in `paths` exists, checked one at a time (one stat per poll, however many
    there are): a wait on the filesystem, which no process-group timeout cuts short however long the work
    takes. A peer that dies ends the job through its launcher (torchrun, srun --kill-on-bad-exit)."""
    start = reported = time.monotonic()
    for done, path in enumerate(paths):
        while not os.path.exists(path):
            time.sleep(poll_seconds)
            if time.monotonic() - reported > report_seconds:
                reported = time.monotonic()
                print(f"waiting for {len(paths) - done} of {len(paths)} {what} ({reported - start:.0f} s so far)",
                      file=sys.stderr, flush=True)
