"""Every command and sub-command answers `--help` with exit 0 and names its options."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from hvdtrain.tools.bench import KINDS

COMMANDS = ("train", "data", "compare", "bench", "doctor", "plan")

# argv before --help -> words the help must show (its options, or the sub-commands it lists)
CASES: dict[tuple[str, ...], tuple[str, ...]] = {
    (): (*COMMANDS, *KINDS),
    ("train",): ("--config", "--backend", "--sync-every", "--model", "--data", "--out"),
    ("data",): ("make",),
    ("data", "make"): ("--rows", "--seed", "--out", "--overwrite"),
    ("compare",): ("--np", "--out", "--data", "--sync-every"),
    ("bench",): KINDS,
    ("bench", "allreduce"): ("--np", "--out", "--min-bytes", "--max-bytes", "--hosts"),
    ("bench", "train"): ("--np", "--out", "--rows", "--sync-every", "--repeat"),
    ("bench", "synthetic"): ("--np", "--model", "--model-args", "--batch-size"),
    ("bench", "convergence"): ("--np", "--workloads", "--lrs", "--tiny"),
    ("bench", "fit"): ("--out", "--epochs", "--repeats"),
    ("doctor",): ("--np", "--timeout", "--json", "--no-smoke"),
    ("plan",): ("--model", "--params", "--nodes", "--profile", "--calibrate", "--validate", "--published"),
}


def test_every_command_and_bench_kind_has_a_case():
    assert {c[0] for c in CASES if c} == set(COMMANDS)
    assert {c[1] for c in CASES if c[:1] == ("bench",) and len(c) == 2} == set(KINDS)


@pytest.mark.parametrize("argv", list(CASES), ids=lambda a: " ".join(a) or "hvdtrain")
def test_help_exits_0_and_names_the_options(argv):
    result = subprocess.run([sys.executable, "-m", "hvdtrain", *argv, "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"hvdtrain {' '.join(argv)} --help exited {result.returncode}: {result.stderr}"
    missing = [w for w in CASES[argv] if not re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", result.stdout)]
    assert not missing, f"hvdtrain {' '.join(argv)} --help does not name {missing}:\n{result.stdout}"


def test_bench_without_a_kind_is_a_usage_error_that_points_at_help():
    result = subprocess.run([sys.executable, "-m", "hvdtrain", "bench"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "hvdtrain bench --help" in result.stderr
    for kind in KINDS:
        assert kind in result.stderr
