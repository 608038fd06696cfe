"""Fuzz `hvdtrain train`: random command lines and TOML files generated from the settings table
(hvdtrain.config.SETTINGS), one case per seed in SEEDS (kept here, so a failure replays:
`pytest tests/test_fuzz_cli.py -k 1234` runs seed 1234 alone).

Each case is a value class applied to 1-3 settings: a valid value, a wrong type, out of range,
NaN/inf, huge, an empty string, a setting of another backend (or model, or data), an unknown
flag or key, a non-UTF-8 path (bytes decoded as the interpreter decodes argv: os.fsdecode,
surrogateescape), or TOML bytes that are not UTF-8. The real command runs: `hvdtrain.cli.main(argv)`
(what `hvdtrain` calls), in one driver process that imports hvdtrain once and runs every case in
turn with its own stderr and stdout (file descriptors 1 and 2 redirected), its own --out inside a
sandbox folder, and its exit code (SystemExit or the return value). For every case:
- exit 2 with exactly one stderr line `hvdtrain: error: ...`, or exit 0 (it trained: tiny
  --rows/--epochs keep that fast); never a traceback;
- no child process left running (and none in the driver's session once it ends);
- nothing written or changed in the sandbox outside the case's --out, and the cwd unchanged.

Not generated: backends mpi/horovod/ddp as the backend of a case (they start a communication
library inside the driver; their settings are tried as settings of another backend), and large
but valid --rows / --epochs / --hidden (they would write, train or allocate for real).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

SEEDS = tuple(range(1000, 1400))  # 400 cases
TIMEOUT = 170  # seconds for all of them (they take ~60-90 s on 2 busy cores)
ROOT = Path(__file__).resolve().parents[1]

# --- the generator ----------------------------------------------------------------------------------

BASE = {"epochs": "1", "batch_size": "16", "threads": "1", "log_every": "2"}  # small: a valid case trains fast
NOT_FUZZED = {"out", "config"}  # --out is chosen per case (below); --config is the TOML form
HUGE_INT = [str(10 ** 20), str(-10 ** 20), str(2 ** 63), str(10 ** 400), "1" + "0" * 5000]  # 5001 digits: no int
HUGE_FLOAT = ["1e308", "1e309", "-1e309", "1" + "0" * 400]
STR_CHOICES = {
    "backend": ["single", "auto", "bogus", "nosuchmod:Sync", "mpi4py:MPI"],
    "data": ["regression", "digits", "nosuch-folder", "nosuchmod:data", "hvdtrain.examples.digits_cnn:digits_datasets"],
    "model": ["net", "mlp", "resnet", "hvdtrain.examples.digits_cnn:DigitsCNN", "os:path", "nosuchmod:Net"],
    "optimizer": ["sgd", "adam", "adamw", "lbfgs", "torch.optim:SGD", "torch.optim:Nope"],
    "loss": ["auto", "mse", "cross_entropy", "hinge", "torch.nn:L1Loss"],
    "partition": ["block", "random", "striped"],
    "dtype": ["float32", "float64", "float16"],
    "mpi_allreduce": ["auto", "native", "ring", "tree"],
    "lr_schedule": ["constant", "cosine", "step"],
    "amp": ["none", "bf16", "fp16", "int8"],
    "outer_optimizer": ["none", "sgd", "nesterov", "adam"],
}
VALID = {"int": ["1", "2", "3"], "float": ["0.5", "0.01", "0.001"], "ints": ["8", "8,8", "2,4"],
         "floats": ["1", "0.5,0.5", "0.25,0.75"], "json": ['{}', '{"weight_decay": 0.01}', '{"width": 8}']}
WRONG_TYPE = {"int": ["abc", "1.5", "[1]", "0x10", "1e3"], "float": ["x", "1,2", "0.5.5", "[]"],
              "ints": ["a,b", "1.5,2", "8;8"], "floats": ["a", "0.5;0.5", "x,1"],
              "json": ["{bad", "[1]", "3", '"text"', "null"], "str": ["3"], "bool": ["yes"]}
OUT_OF_RANGE = {"int": ["-1", "0", "-100"], "float": ["-1", "0", "1.5", "-0.0", "2"],
                "ints": ["0", "-8", "4,10", "8,0"],
                "floats": ["-0.5,1.5", "0.2,0.2", "2"], "json": ['{"lr": -1}'], "str": ["bogus"]}
NAN_INF = ["nan", "inf", "-inf", "NaN", "Infinity"]


def _setting_kinds() -> dict[str, Any]:
    from hvdtrain.config import SETTINGS
    return {s.kwarg: s for s in SETTINGS if s.kwarg not in NOT_FUZZED}


def _toml_scalar(text: str, kind: str) -> str:
    """A CLI value as the TOML value of a setting of `kind` (kept as a string when it is not one)."""
    def number(t: str) -> str | None:
        low = t.lower()
        if low in ("nan", "inf", "-inf", "+inf"):
            return low
        if low == "infinity":
            return "inf"
        try:
            int(t)
            return t
        except ValueError:
            pass
        try:
            float(t)
            return t if any(c in t for c in ".eE") else None
        except ValueError:
            return None
    if kind in ("int", "float"):
        n = number(text)
        return n if n is not None else json.dumps(text)
    if kind in ("ints", "floats"):
        parts = [number(p) for p in text.split(",")] if text else []
        return "[" + ", ".join(p if p is not None else json.dumps(q) for p, q in zip(parts, text.split(","))) + "]"
    if kind == "json":
        try:
            value = json.loads(text)
        except ValueError:
            return json.dumps(text)
        if isinstance(value, dict):
            return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + " }"
        return json.dumps(value) if value is not None else '"null"'
    if kind == "bool":
        return {"yes": '"yes"'}.get(text, "true")
    return json.dumps(text)


def generate(seed: int, sandbox: Path, configs: Path) -> dict[str, Any]:
    """One case: argv for `hvdtrain` (after the program name), optional TOML bytes, its --out."""
    rng = random.Random(seed)
    settings = _setting_kinds()
    out = str(sandbox / f"out-{seed}")
    form = "toml" if rng.random() < 0.4 else "cli"
    classes = ["valid", "wrong_type", "out_of_range", "nan_inf", "huge", "empty", "other_backend", "unknown",
               "non_utf8"]
    flags: list[str] = []
    toml: dict[tuple[str | None, str], str] = {}
    raw_toml: list[str] = []
    notes = []
    backend = rng.choice(["single", "single", "auto", None])
    rows = True
    base = dict(BASE)
    refuse = False  # a setting of another backend (this run's is single): it must be refused
    for _ in range(rng.choice([1, 1, 2, 3])):
        cls = rng.choice(classes)
        if cls == "unknown":
            name = rng.choice(["--sync-evry", "--learning-rate", "--bogus", "--epoch", "--hvd"])
            flags += [name, "3"] if form == "cli" else []
            if form == "toml":
                raw_toml.append(rng.choice(["learning_rate = 0.1", "bogus = 1", "[nope]\nx = 1", "[sync]\nk = 4",
                                            "[model]\nwidth = 3"]))
            notes.append(f"unknown {name}")
            continue
        if cls == "non_utf8":
            what = rng.choice(["out", "data", "config", "model", "toml-bytes", "out"])
            weird = os.fsdecode(b"\xff\xfe-" + bytes([rng.randrange(0x80, 0x100)]) + b"\xc3")
            if what == "out":
                out = str(sandbox / f"out-{seed}-{weird}")
            elif what == "data":
                flags += ["--data", str(sandbox / f"data-{weird}")]
                rows = False
            elif what == "model":
                flags += ["--model", f"mod{weird}:Net"]
            elif what == "config":
                form = "toml"
                notes.append("config with a non-UTF-8 name")
            else:
                form = "toml"
                raw_toml.append("epochs = 1 # \udcff\udcfe")  # written as bytes below: not UTF-8
            notes.append(f"non-UTF-8 {what}")
            continue
        if cls == "other_backend":
            from hvdtrain.config import APPLIES, field_default
            kwarg = rng.choice([k for k, r in APPLIES.items() if r.backends or r.models or r.data or r.optimizers
                                or r.elastic is True])
            s = settings[kwarg]
            refuse = refuse or bool(APPLIES[kwarg].backends or APPLIES[kwarg].elastic is True)
            value = {"bool": None, "int": "5", "float": "0.5", "ints": "8,8" if kwarg == "hidden" else "2,4",
                     "floats": "0.25,0.75", "json": '{"width": 8}', "str": "ring"}[s.kind]
            if kwarg == "outer_optimizer":
                value = "nesterov"
            if kwarg == "rows":
                value, rows = "50", False
            if s.kind == "bool" and form == "cli":
                flags.append(s.flag)
            elif s.kind == "bool":
                toml[(s.section, s.key)] = "true"
            elif form == "cli":
                flags += [s.flag, value]
            else:
                toml[(s.section, s.key)] = _toml_scalar(value, s.kind)
            notes.append(f"{cls} {kwarg} (default {field_default(s)!r})")
            continue
        kwarg = rng.choice(sorted(settings))
        s = settings[kwarg]
        kind = "str" if s.kind == "str" else s.kind
        if cls == "valid":
            value = rng.choice(STR_CHOICES.get(kwarg, ["x"])[:3] if kind == "str" else VALID.get(kind, ["1"]))
        elif cls == "wrong_type":
            value = rng.choice(WRONG_TYPE[kind])
        elif cls == "out_of_range":
            value = rng.choice(OUT_OF_RANGE.get(kind, ["-1"]) if kind != "str" else STR_CHOICES.get(kwarg, ["?"])[3:]
                               or ["bogus"])
        elif cls == "nan_inf":
            value = rng.choice(NAN_INF) if kind not in ("ints", "floats", "json") else \
                {"ints": "nan,1", "floats": "nan,0.5", "json": '{"x": NaN}'}[kind]
        elif cls == "huge":
            if kwarg in ("epochs", "rows", "hidden"):  # valid but expensive: not generated
                kwarg, s, kind = "seed", settings["seed"], "int"
            value = rng.choice(HUGE_INT) if kind in ("int", "ints") else rng.choice(HUGE_FLOAT) \
                if kind in ("float", "floats") else "x" * 5000
        else:  # empty
            value = ""
        if kwarg == "data":  # --rows is the built-in regression set's: other data would refuse it
            rows = rows and value == "regression"
        if kwarg == "backend":
            backend = None
        if kwarg == "rows":
            rows = False
        if form == "toml":
            base.pop(kwarg, None)  # the command line would win over the TOML value
        if s.kind == "bool":
            if form == "toml":
                toml[(s.section, s.key)] = {"valid": "true", "wrong_type": '"yes"', "empty": '""'}.get(cls, "1")
            elif cls == "valid":
                flags.append(s.flag)
            else:
                flags.append(f"{s.flag}={value}")  # a switch takes no value: argparse refuses
        elif form == "toml":
            if cls == "empty":
                toml[(s.section, s.key)] = {"ints": "[]", "floats": "[]", "json": "{}"}.get(kind, '""')
            else:
                toml[(s.section, s.key)] = _toml_scalar(value, kind)
        else:
            flags += [s.flag, value] if not value.startswith("-") or cls == "unknown" else [f"{s.flag}={value}"]
        notes.append(f"{cls} {kwarg}={value[:40]!r}")
    argv = ["train", *(["--backend", backend] if backend else []), *(["--rows", "64"] if rows else []),
            *[x for k, v in base.items() for x in (settings[k].flag, v)]]
    data = None
    if form == "toml":
        sections: dict[str | None, list[str]] = {}
        for (section, key), text in toml.items():
            sections.setdefault(section, []).append(f"{key} = {text}")
        lines = sections.pop(None, []) + [line for line in raw_toml if not line.startswith("[")]
        lines += [f"[{name}]\n" + "\n".join(body) for name, body in sections.items()]
        lines += [line for line in raw_toml if line.startswith("[")]
        data = ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")
        name = b"run-%d" % seed + (b"-\xff" if "config with a non-UTF-8 name" in notes else b"") + b".toml"
        argv += ["--config", os.fsdecode(os.path.join(os.fsencode(configs), name))]
    argv += [*flags, "--out", out]
    return {"seed": seed, "argv": argv, "toml": data.decode("utf-8", "surrogateescape") if data else None,
            "out": out, "notes": notes, "refuse": refuse}


# --- the driver: runs inside its own process, imports hvdtrain once ---------------------------------

def _procs(field: int, value: int) -> list[str]:
    """'pid name' of live processes whose /proc/PID/stat field `field` (after the name: 1 = ppid,
    3 = session id) is `value`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[field]) == value:
                found.append(f"{entry} {stat[stat.index('(') + 1:stat.rindex(')')]}")
    return found


def _children(pid: int) -> list[str]:
    return _procs(1, pid)


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(folder)):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            found[os.fsdecode(path)] = (st.st_mtime_ns, st.st_size) if not os.path.isdir(path) else (0, 0)
    return found


def drive(cases_path: str, results_path: str) -> int:
    import io
    import tempfile
    import traceback

    from hvdtrain import cli

    class HardExit(BaseException):
        """os._exit (a rank's abort) inside a case: its exit code, and the driver goes on."""

    def hard_exit(code: int) -> None:
        raise HardExit(code)

    real_exit = os._exit
    cases = json.loads(Path(cases_path).read_text())
    sandbox = Path(os.getcwd())
    with open(results_path, "a") as results:
        for case in cases:
            if case["toml"] is not None:
                config = os.fsencode(case["argv"][case["argv"].index("--config") + 1])
                Path(os.fsdecode(config)).write_bytes(case["toml"].encode("utf-8", "surrogateescape"))
            before, cwd = _listing(sandbox), os.getcwd()
            start = time.perf_counter()
            with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
                sys.stdout.flush()
                sys.stderr.flush()
                saved = os.dup(1), os.dup(2)
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                os._exit = hard_exit  # type: ignore[assignment]
                try:
                    code: Any = cli.main(list(case["argv"]))
                except HardExit as exc:
                    code = exc.args[0]
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                    if isinstance(exc.code, str):
                        sys.stderr.write(exc.code + "\n")
                except BaseException:
                    traceback.print_exc()
                    code = "exception"
                finally:
                    os._exit = real_exit
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os.dup2(saved[0], 1)
                    os.dup2(saved[1], 2)
                    os.close(saved[0])
                    os.close(saved[1])
                err.seek(0)
                out.seek(0)
                stderr = err.read().decode("utf-8", "backslashreplace")
                stdout = out.read().decode("utf-8", "backslashreplace")
            after = _listing(sandbox)
            changed = sorted(p for p, v in after.items() if before.get(p) != v)
            gone = sorted(p for p in before if p not in after)
            results.write(json.dumps({"seed": case["seed"], "code": code, "stderr": stderr, "stdout": stdout[-500:],
                                      "changed": changed, "gone": gone, "cwd_same": os.getcwd() == cwd,
                                      "children": _children(os.getpid()),
                                      "seconds": round(time.perf_counter() - start, 3)}) + "\n")
            results.flush()
            if os.getcwd() != cwd:
                os.chdir(cwd)
    return 0


# --- the test ---------------------------------------------------------------------------------------

def _session_members(sid: int) -> list[str]:
    return _procs(3, sid)


def _inside(path: str, out: str) -> bool:
    path, out = os.path.normpath(path), os.path.normpath(out)
    return path == out or path.startswith(out + os.sep)


@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    sandbox, configs = root / "sandbox", root / "configs"
    sandbox.mkdir()
    configs.mkdir()
    (sandbox / "file.txt").write_text("a file, not a folder\n")
    cases = [generate(seed, sandbox, configs) for seed in SEEDS]
    (root / "cases.json").write_text(json.dumps(cases))
    results = root / "results.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "SLURM_", "HOROVOD_"))}
    env["PYTHONPATH"] = str(ROOT)
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--drive", str(root / "cases.json"),
                             str(results)], cwd=sandbox, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    seconds = time.monotonic() - start
    left = _session_members(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    done = {}
    if results.exists():
        for line in results.read_text().splitlines():
            record = json.loads(line)
            done[record["seed"]] = record
    codes = [str(r["code"]) for r in done.values()]
    print(f"fuzz: {len(done)} of {len(SEEDS)} cases in {seconds:.1f} s; exit codes "
          f"{sorted((c, codes.count(c)) for c in set(codes))}")
    return {"cases": {c["seed"]: c for c in cases}, "done": done, "returncode": proc.returncode,
            "output": output.decode("utf-8", "backslashreplace"), "left": left, "seconds": seconds}


def test_the_driver_ran_every_case_in_time_and_left_nothing(fuzz_results):
    r = fuzz_results
    missing = [s for s in SEEDS if s not in r["done"]]
    assert not missing, (f"driver stopped (exit {r['returncode']}) at seed {missing[0]}: "
                         f"{r['cases'][missing[0]]}\n{r['output'][-3000:]}")
    assert r["returncode"] == 0, r["output"][-3000:]
    assert not r["left"], f"processes left in the driver's session: {r['left']}"
    assert r["seconds"] < 120, f"the fuzz took {r['seconds']:.0f} s; keep it under 2 minutes"


def test_the_cases_cover_every_class(fuzz_results):
    notes = [n for c in fuzz_results["cases"].values() for n in c["notes"]]
    for cls in ("valid", "wrong_type", "out_of_range", "nan_inf", "huge", "empty", "other_backend", "unknown",
                "non-UTF-8"):
        assert sum(n.startswith(cls) for n in notes) >= 5, cls
    forms = [c["toml"] is not None for c in fuzz_results["cases"].values()]
    assert sum(forms) >= 60 and len(forms) - sum(forms) >= 100
    codes = [r["code"] for r in fuzz_results["done"].values()]
    assert codes.count(0) >= 10 and codes.count(2) >= 100, "the generator no longer reaches both outcomes"


@pytest.mark.parametrize("seed", SEEDS)
def test_case(fuzz_results, seed):
    case, record = fuzz_results["cases"][seed], fuzz_results["done"].get(seed)
    if record is None:
        pytest.fail(f"not run (see test_the_driver_ran_every_case_in_time_and_left_nothing): {case}")
    where = f"hvdtrain {' '.join(case['argv'])!r}\nTOML: {case['toml']!r}\nnotes: {case['notes']}"
    stderr = record["stderr"]
    assert "Traceback" not in stderr + record["stdout"], f"{where}\n{stderr[-3000:]}"
    assert record["code"] in (0, 2), f"exit {record['code']}: {where}\n{stderr[-3000:]}"
    if case["refuse"]:
        assert record["code"] == 2, f"a setting of another backend was not refused: {where}\n{stderr[-3000:]}"
    if record["code"] == 2:
        lines = stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("hvdtrain: error: "), f"{where}\n{stderr[-3000:]}"
    else:
        assert os.path.isfile(os.path.join(case["out"], "summary.json")), f"{where}\n{stderr[-3000:]}"
    assert not record["children"], f"children left: {record['children']}\n{where}"
    assert record["cwd_same"], where
    outside = [p for p in record["changed"] + record["gone"] if not _inside(p, case["out"])]
    assert not outside, f"written outside --out {case['out']!r}: {outside}\n{where}"


# --- what the fuzz found, pinned (each was a traceback or a crash before) ---------------------------

@pytest.mark.parametrize("toml,overrides,needle", [
    ("", {"seed": 10 ** 20}, "--seed (TOML seed) 100000000000000000000 is out of range"),  # torch.manual_seed overflow
    ("", {"model": {"name": "mlp", "hidden": [10 ** 30]}}, "integers must lie in [-2**63, 2**63)"),  # torch.empty
    ("[optim]\nmomentum = 1" + "0" * 400 + "\n", {}, "a number must fit in a float"),  # OverflowError in isfinite
    ("[sync]\nalpha = 1" + "0" * 400 + "\n", {}, "--alpha (TOML sync.alpha)"),
    ("seed = 1" + "0" * 5000 + "\n", {}, "is not valid TOML (Exceeds the limit"),  # tomllib: ValueError
    ("", {"seed": 10 ** 5000}, "--seed (TOML seed) an integer of 16610 bits"),  # fit: no repr (int-to-str limit)
    ("", {"threads": 100_000}, "threads must be in [0, 1024]"),  # OpenMP: thread creation failed, segfault
    ("", {"collective_timeout": 0.01}, "0 (never) or 1 to"),  # the watchdog ended every run, exit 1
    ("", {"collective_timeout": 1e300}, "0 (never) or 1 to"),  # timedelta / Horovod's C int overflow
    ("", {"optim": {"lr": 1e300}}, "lr must be at most"),  # RuntimeError in the float32 optimizer step
    ("", {"tensorboard": True, "out": os.fsdecode(b"out-\xff")}, "--tensorboard takes an --out that is valid UTF-8"),
], ids=["seed", "hidden", "momentum", "alpha", "toml-digits", "fit-digits", "threads", "timeout-small", "timeout-huge",
        "lr", "tensorboard-out"])
def test_fuzz_findings_are_config_errors(toml, overrides, needle, tmp_path):
    from hvdtrain.config import ConfigError, load_config
    path = None
    if toml:
        path = tmp_path / "run.toml"
        path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path) if path else None, overrides)
    assert needle in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_empty_or_unusable_config_path_is_refused_not_ignored():
    from hvdtrain.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="config file '' does not exist"):
        load_config("")
    with pytest.raises(ConfigError, match=r"cannot be read \(File name too long\)"):
        load_config("x" * 5000)


def test_a_data_path_too_long_to_look_up_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hvdtrain", "train", "--backend", "single", "--data", "x" * 5000,
                             "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr[-2000:]
    assert "cannot be looked up (File name too long)" in result.stderr


if __name__ == "__main__" and sys.argv[1:2] == ["--drive"]:
    sys.exit(drive(sys.argv[2], sys.argv[3]))
