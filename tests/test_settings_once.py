"""Each setting is defined once: the README's tables agree with the definitions, and no module or
job script re-defines a value that has a home.

Homes: run settings -> the dataclass fields of hvdtrain/config.py; MPI/Horovod environment ->
hvdtrain/comm/env.py; exit codes -> hvdtrain/errors.py.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hvdtrain import errors
from hvdtrain.comm import env as E
from hvdtrain.config import BY_KWARG, SETTINGS, SyncConfig, default_backend, field_default, load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


# --- the README's settings table against the dataclasses -------------------------------------------

def settings_table(text: str) -> list[tuple[list[str], list[str]]]:
    """(flags, defaults) of each row of the `| flag | default | meaning |` table: the flags are
    the backticked `--name ...` tokens of the first cell, the defaults the backticked tokens of the
    second, in the same order."""
    lines = text.splitlines()
    start = lines.index("| flag | default | meaning |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        flags = [t.split()[0] for t in re.findall(r"`([^`]+)`", cells[0]) if t.startswith("--")]
        rows.append((flags, re.findall(r"`([^`]+)`", cells[1])))
    return rows


def rendered(value: object) -> str:
    """A default as the table writes it."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return "{}" if not value else repr(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def table_mismatches(text: str) -> list[str]:
    by_flag = {s.flag: s for s in SETTINGS}
    problems, seen = [], set()
    for flags, defaults in settings_table(text):
        if len(flags) != len(defaults):
            problems.append(f"row {flags}: {len(flags)} flags but {len(defaults)} defaults {defaults}")
            continue
        for flag, written in zip(flags, defaults):
            if flag not in by_flag:
                problems.append(f"{flag} is in the table but is no setting")
                continue
            seen.add(flag)
            actual = rendered(field_default(by_flag[flag]))
            if written != actual:
                problems.append(f"{flag}: the README says `{written}`, config.py says `{actual}`")
    problems += [f"{flag} (a setting) is missing from the table" for flag in by_flag if flag not in seen]
    return problems


def test_readme_table_lists_every_setting_with_its_default() -> None:
    assert table_mismatches(README) == []


def test_table_check_catches_a_wrong_default_and_a_missing_setting() -> None:
    planted = README.replace("| `--rows N` | `100000` |", "| `--rows N` | `50000` |")
    assert planted != README
    assert any("--rows: the README says `50000`" in p for p in table_mismatches(planted))
    dropped = "\n".join(line for line in README.splitlines() if not line.startswith("| `--threads N`"))
    assert "--threads (a setting) is missing from the table" in table_mismatches(dropped)


def prose_mismatches(text: str) -> list[str]:
    """Defaults quoted in prose as "`--flag` (300 s)" agree with the field."""
    by_flag = {s.flag: s for s in SETTINGS}
    return [f"{flag} ({value} s) but config.py says {field_default(by_flag[flag])}"
            for flag, value in re.findall(r"`(--[a-z-]+)` \((?:default )?([0-9.]+) s\)", text)
            if flag in by_flag and float(value) != float(field_default(by_flag[flag]))]


def test_readme_prose_defaults() -> None:
    assert re.search(r"`--collective-timeout` \(", README), "the README no longer quotes the timeout"
    assert prose_mismatches(README) == []
    assert prose_mismatches(README.replace("`--collective-timeout` (300 s)", "`--collective-timeout` (600 s)"))


def exit_code_mismatches(text: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith("Exit codes:"))
    listed = {m.group(2).split(" (")[0].strip(): int(m.group(1))
              for m in re.finditer(r"(\d+) ([^,.]+)", line[len("Exit codes:"):])}
    problems = [f"README lists {listed}, hvdtrain/errors.py {errors.EXIT_CODES}"] if listed != errors.EXIT_CODES else []
    # hvdtrain's own codes in prose ("exit **3**", "exit code 2"; not e.g. Horovod's "exit 134")
    quoted = re.findall(r"exits? \*\*(\d+)\*\*|exit(?:s with| with)? code (\d+)", text)
    problems += [f"README says exit {n}, which hvdtrain/errors.py does not define"
                 for pair in quoted for n in pair if n and int(n) not in errors.EXIT_CODES.values()]
    return problems


def test_readme_exit_codes_are_errors_py() -> None:
    assert exit_code_mismatches(README) == []
    assert exit_code_mismatches(README.replace("3 NaN/Inf", "4 NaN/Inf"))
    assert exit_code_mismatches(README.replace("exit **3**", "exit **4**"))


def test_readme_mpi_settings_are_comm_env() -> None:
    written = dict(re.findall(r"`((?:OMPI_MCA_|THP_|HOROVOD_STALL_)\w+)=([^`\s]+)`", README))
    home = {**E.EVERY_JOB, **E.ONE_HOST}
    assert written, "the README no longer lists hvdtrain's MPI settings"
    assert {k: v for k, v in written.items() if k in home and home[k] != v} == {}


# --- literal re-definitions outside their home -----------------------------------------------------

HOMES = {"hvdtrain/comm/env.py", "hvdtrain/errors.py", "hvdtrain/config.py"}
_ENV_KEYS = "|".join(sorted({*E.EVERY_JOB, *E.ONE_HOST, *E.STALL_KEYS}))
PATTERNS = [  # (what, regex) for code lines (comments skipped)
    ("an MPI/Horovod setting of comm/env.py", rf"\b({_ENV_KEYS})\s*=|[\"']({_ENV_KEYS})[\"']\s*[:,\]]"
                                               rf"|\$\{{({_ENV_KEYS}):-"),
    ("an Open MPI parameter (hvdtrain's live in comm/env.py)", r"\bOMPI_MCA_\w+\s*=|[\"']OMPI_MCA_\w+[\"']\s*:"),
    ("an exit code (hvdtrain/errors.py)", r"\bEXIT_[A-Z_]+\s*=\s*\d+|\b(sys\.exit|exit|Abort|abort)\(\s*(99|3)\s*\)"
                                           r"|\breturn\s+(99|3)\b|\breturncode\s*[!=]=\s*(99|3)\b|^\s*exit\s+(99|3)\b"
                                           r"|\[\s*\"?\$\w+\"?\s*(=|-eq)\s*\"?(99|3)\"?\s*\]"),
    ("the collective timeout default (TrainConfig.collective_timeout)", r"=\s*300(\.0)?\b(?!\s*[*/])"),
    ("the rows default (DataConfig.rows)", r"\b100_000\b|default\s*=\s*100000\b"),
]


def redefinitions(text: str, path: str) -> list[str]:
    """`path:line: text (what)` for each line of `text` that re-defines a value with a home."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        for what, pattern in PATTERNS:
            if re.search(pattern, line):
                found.append(f"{path}:{number}: {line.strip()}  ({what})")
    return found


def project_files() -> list[Path]:
    files = [*(ROOT / "hvdtrain").rglob("*.py"), *(ROOT / "mpi_jobs").glob("*.sh"),
             *(ROOT / "slurm").glob("*.sh"), *(ROOT / "slurm").glob("*.sbatch")]
    return sorted(f for f in files if f.relative_to(ROOT).as_posix() not in HOMES)


def test_no_literal_redefinitions_outside_their_home() -> None:
    found = [hit for f in project_files() for hit in redefinitions(f.read_text(), f.relative_to(ROOT).as_posix())]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize("planted", [
    'env.setdefault("THP_MEM_ALLOC_ENABLE", "1")',
    '  export THP_MEM_ALLOC_ENABLE="${THP_MEM_ALLOC_ENABLE:-1}"',
    'export OMPI_MCA_coll_tuned_allreduce_algorithm=5',
    '    env = {"OMPI_MCA_mpi_yield_when_idle": "1"}',
    'os.environ["HOROVOD_STALL_CHECK_TIME_SECONDS"] = "60"',
    'EXIT_PREEMPTED = 99',
    '        return 3',
    '    exit 99',
    '  if [ "$rc" = 99 ]; then',
    'def make_comm(kind: str, collective_timeout: float = 300.0) -> Comm:',
    '    make.add_argument("--rows", type=int, default=100_000)',
])
def test_checker_finds_a_planted_duplicate(planted: str) -> None:
    assert redefinitions(f"import os\n{planted}\n", "planted.py"), planted


@pytest.mark.parametrize("clean", [
    "from hvdtrain.errors import EXIT_PREEMPTED, EXIT_USAGE",
    "        sleep 300 &",
    "# hvdtrain exits 99 when preempted",
    "    timeout = 300 * 2",
    '  exports="$("$PY" -m hvdtrain.comm.env --sh "${layout[@]}")"',
    "    return EXIT_NUMERICAL",
])
def test_checker_passes_clean_lines(clean: str) -> None:
    assert redefinitions(clean, "clean.py") == []


# --- one rule per default --------------------------------------------------------------------------

LAUNCHER_VARS = ("OMPI_COMM_WORLD_", "PMI_", "PMIX_", "SLURM_", "HOROVOD_")


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith(LAUNCHER_VARS):
            monkeypatch.delenv(key)
    return monkeypatch


def test_backend_default_is_one_rule_for_cli_fit_and_toml(no_launcher: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert field_default(BY_KWARG["backend"]) == "auto"
    assert "launcher" in BY_KWARG["backend"].help and "single" in BY_KWARG["backend"].help
    assert default_backend() == SyncConfig().backend == load_config().sync.backend == "single"
    toml = tmp_path / "run.toml"
    toml.write_text('[sync]\nbackend = "auto"\n')
    assert load_config(str(toml)).sync.backend == "single"
    launched = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}
    assert default_backend(launched) == "horovod"
    for key, value in launched.items():
        no_launcher.setenv(key, value)
    assert SyncConfig().backend == load_config().sync.backend == "horovod"
    assert load_config(None, {"sync": {"backend": "mpi"}}).sync.backend == "mpi"  # given: kept
    api = (ROOT / "hvdtrain" / "api.py").read_text()
    assert "detect_layout" not in api and '"horovod"' not in api, "fit() decides the backend again"


def test_data_make_and_compare_take_rows_and_seed_from_the_dataclasses() -> None:
    from hvdtrain.cli import build_parser
    from hvdtrain.tools.compare import build_parser as compare_parser
    args = build_parser().parse_args(["data", "make", "regression", "--out", "x"])
    cmp = compare_parser().parse_args([])
    assert args.rows == cmp.rows == field_default(BY_KWARG["rows"])
    assert args.seed == cmp.seed == field_default(BY_KWARG["seed"])
    assert cmp.alpha == field_default(BY_KWARG["alpha"]) and cmp.mpi_allreduce == field_default(BY_KWARG["mpi_allreduce"])


def test_collective_timeout_reaches_horovod_stall_settings() -> None:
    timeout = field_default(BY_KWARG["collective_timeout"])
    env = E.env_defaults(timeout)
    assert env["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] == str(int(timeout))
    assert set(E.STALL_KEYS) <= set(env) and not set(E.STALL_KEYS) & set(E.env_defaults(0))
    import inspect
    from hvdtrain.comm import make_comm
    from hvdtrain.comm.torchdist import TorchDistComm
    for fn in (make_comm, TorchDistComm.__init__):  # no default of their own: the setting's
        assert inspect.signature(fn).parameters["collective_timeout"].default is inspect.Parameter.empty


# --- comm/env.py: one dict, every entry point --------------------------------------------------------

def test_job_env_defaults_follow_the_layout(no_launcher: pytest.MonkeyPatch) -> None:
    one_host = {**E.EVERY_JOB, **E.ONE_HOST}
    assert E.job_env_defaults(2) == E.job_env_defaults(2, "localhost:2") == one_host
    assert E.job_env_defaults(4, "h1:2,h2:2") == E.job_env_defaults() == E.EVERY_JOB
    assert E.horovod_env_defaults() == one_host  # one process
    for key, value in {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4",
                       "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}.items():
        no_launcher.setenv(key, value)
    assert E.horovod_env_defaults() == E.EVERY_JOB  # two hosts: Open MPI's own choice
    no_launcher.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4")
    assert E.horovod_env_defaults() == one_host


def test_launcher_env_applies_the_same_dict_and_user_values_win(no_launcher: pytest.MonkeyPatch) -> None:
    from hvdtrain.tools.launch import FORWARD_VARS, launcher_env
    for key in {**E.EVERY_JOB, **E.ONE_HOST}:
        no_launcher.delenv(key, raising=False)
    env = launcher_env(np=2)
    assert {k: env[k] for k in E.job_env_defaults(2)} == E.job_env_defaults(2)
    assert not set(E.ONE_HOST) & set(launcher_env(np=4, hosts="h1:2,h2:2"))
    assert "THP_MEM_ALLOC_ENABLE" in FORWARD_VARS
    no_launcher.setenv("OMPI_MCA_coll_tuned_allreduce_algorithm", "2")
    assert launcher_env(np=2)["OMPI_MCA_coll_tuned_allreduce_algorithm"] == "2"


def _bash(script: str, env: dict[str, str]) -> str:
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60,
                            start_new_session=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(LAUNCHER_VARS) and k not in {**E.EVERY_JOB, **E.ONE_HOST}}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def _exported(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line.startswith(("OMPI_MCA_", "THP_")))


def test_shell_printer_user_value_wins() -> None:
    script = (f'export OMPI_MCA_coll_tuned_allreduce_algorithm=2\n'
              f'eval "$("{sys.executable}" -m hvdtrain.comm.env --sh --np 2)"\nenv\n')
    got = _exported(_bash(script, _clean_env()))
    assert got == {**E.EVERY_JOB, **E.ONE_HOST, "OMPI_MCA_coll_tuned_allreduce_algorithm": "2"}


def test_mpi_jobs_common_sh_applies_comm_env() -> None:
    venv = Path(sys.executable).parent.parent
    script = f'source "{ROOT}/mpi_jobs/common.sh"\nhvd_setup probe\nhvd_rank_env\nenv\n'
    assert _exported(_bash(script, _clean_env(NP="2", VENV=str(venv)))) == E.job_env_defaults(2)
    across = _bash(script, _clean_env(NP="4", HOSTS="h1:2,h2:2", VENV=str(venv)))
    assert _exported(across) == E.job_env_defaults(4, "h1:2,h2:2")


def test_slurm_common_sh_applies_comm_env_and_exit_code() -> None:
    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "hvdtrain").exists():
        pytest.skip("the venv has no hvdtrain console script (make install)")
    script = f'source "{ROOT}/slurm/common.sh"\nhvd_setup >/dev/null\nenv\necho "EXIT=$HVD_EXIT_PREEMPTED"\n'
    out = _bash(script, _clean_env(HVDTRAIN_VENV=str(venv), SLURM_JOB_NUM_NODES="1", SLURM_NTASKS="2"))
    assert _exported(out) == E.job_env_defaults(2)
    assert f"EXIT={errors.EXIT_PREEMPTED}" in out
    out = _bash(script, _clean_env(HVDTRAIN_VENV=str(venv), SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="4"))
    assert _exported(out) == E.job_env_defaults()


def test_every_exit_code_is_defined_once() -> None:
    codes = {name: getattr(errors, name) for name in dir(errors) if name.startswith("EXIT_") and name != "EXIT_CODES"}
    assert sorted(codes.values()) == sorted(errors.EXIT_CODES.values())
    assert len(set(codes.values())) == len(codes)
    from hvdtrain import cli
    assert cli.EXIT_USAGE is errors.EXIT_USAGE and cli.EXIT_NUMERICAL is errors.EXIT_NUMERICAL



def test_the_mpi_fallbacks_sync_settings_have_one_default() -> None:
    """FlatAverager takes alpha and allreduce without defaults: SyncConfig holds the only ones
    (a default here would be a second definition that training never reads)."""
    import ast

    # read, not imported: importing the module imports mpi4py.MPI, which starts MPI in this process
    tree = ast.parse((ROOT / "hvdtrain" / "strategies" / "mpi_average.py").read_text())
    init = next(f for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "FlatAverager"
                for f in c.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    args = init.args.args[1:]  # after self
    defaulted = {a.arg for a in args[len(args) - len(init.args.defaults):]} if init.args.defaults else set()
    defaulted |= {a.arg for a, d in zip(init.args.kwonlyargs, init.args.kw_defaults) if d is not None}
    assert {"alpha", "allreduce"} <= {a.arg for a in args + init.args.kwonlyargs}
    for name in ("alpha", "allreduce"):
        assert name not in defaulted, f"FlatAverager({name}=...) redefines SyncConfig's default"
    assert field_default(BY_KWARG["mpi_allreduce"]) == SyncConfig().mpi_allreduce


def test_lr_scaling_is_written_once() -> None:
    """One `scale_lr` (SyncStrategy.scale_lr); the strategies call it, none re-implements it, and
    nothing else in the package multiplies a learning rate by the world size."""
    pkg = ROOT / "hvdtrain"
    defs = [p.relative_to(ROOT).as_posix() for p in pkg.rglob("*.py") if re.search(r"^\s*def scale_lr\b", p.read_text(), re.M)]
    assert defs == ["hvdtrain/strategies/base.py"], defs
    by_size = re.compile(r"lr\w*\s*\*=?\s*[\w.]*(size|world)|(size|world)\w*\s*\*\s*[\w.]*lr")
    assert by_size.search('group["lr"] = lr * self.comm.size')  # the one in base.py, as the check sees it
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in pkg.rglob("*.py") if "tools" not in p.parts
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if by_size.search(line) and p.name != "base.py"]
    assert not offenders, offenders
