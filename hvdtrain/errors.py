"""The one user-facing error type and every exit code hvdtrain's commands and job scripts use (kept
here, at the bottom of the import graph, so every module and the slurm/ scripts read them from
one place: `python -c 'from hvdtrain.errors import EXIT_PREEMPTED; print(EXIT_PREEMPTED)'`)."""

EXIT_OK = 0
"""The run finished."""
EXIT_FAILED = 1
"""A rank failed (an exception or a crash); the job was ended on every rank."""
EXIT_USAGE = 2
"""Bad input: a setting, a file or the launch; one line on stderr names the value and the fix."""
EXIT_NUMERICAL = 3
"""The loss became NaN/Inf; every rank stopped together."""
EXIT_PREEMPTED = 99
"""SIGTERM/SIGUSR1 (preemption, a time limit): a checkpoint was written; resume with --resume."""

EXIT_CODES = {"done": EXIT_OK, "a rank failed": EXIT_FAILED, "bad input": EXIT_USAGE,
              "NaN/Inf": EXIT_NUMERICAL, "preempted": EXIT_PREEMPTED}
"""What each exit code means, as the README's `Exit codes:` line lists them."""


class ConfigError(ValueError):
    """A user-facing configuration error: one line naming the value and the fix.

    The CLI prints it and exits EXIT_USAGE (2); `hvdtrain.fit` raises it on every rank.
    """
