"""Errors a user can fix, and the one way every script reports them: a single line, exit code 2.

Bad input (a missing file, a flag that contradicts a config, a corrupt checkpoint) raises
`UserError` with what is wrong and how to fix it; the script's `run_cli` prints it without a
traceback. `--debug` (or `debug: true` in a recipe) shows the traceback instead.
"""

import os
import sys


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2 (or the error's own `exit_code`)."""

    exit_code = 2


show_tracebacks = False  # set from --debug once the flags are parsed (utils/config.py)


def first_line(error):
    """The first line of an exception's message (or of its cause's), at most 200 characters."""
    cause = error.__cause__ or error
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]


def run_cli(main, argv=None):
    """Run a script's main(argv) and exit with its return code; a UserError becomes one line on stderr."""
    try:
        code = main(argv)
    except UserError as error:
        record_exit(error.exit_code)
        if show_tracebacks:
            raise
        print(f"error: {error}", file=sys.stderr)
        code = error.exit_code
    except SystemExit as done:
        record_exit(done.code if isinstance(done.code, int) else 1)
        raise
    except BaseException:
        record_exit(1)
        raise
    record_exit(code or 0)
    sys.exit(code or 0)


def record_exit(code):
    """Write the exit code to $EXIT_STATUS_FILE, on the first process of the job only: a launcher
    (torchrun under `accelerate launch`) turns any worker's non-zero code into its own 1, and a job
    script (slurm/train.sbatch) reads the file to exit with what happened: 0 done, 75 stopped on a
    signal (requeue), 3 diverged, 2 bad input, 1 a crash."""
    path = os.environ.get("EXIT_STATUS_FILE")
    if path and os.environ.get("RANK", "0") == "0":
        try:
            with open(path, "w") as f:
                f.write(f"{code}\n")
        except OSError:
            pass
