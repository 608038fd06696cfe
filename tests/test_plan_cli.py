"""`hvdtrain plan` from the command line and as a function: flags only (no cluster, no profile),
a profile, bad input (one line, exit 2, no traceback), --help, --published. Nothing is launched."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hvdtrain.tools.plan import main, plan
from hvdtrain.tools.plan import profile as P
from hvdtrain.tools.plan.report import ROW_KEYS

FLAGS = ["--params", "25e6", "--samples-per-second", "200", "--batch-size", "64", "--nodes", "1,2,4",
         "--ranks-per-node", "2", "--inter-gbit", "10"]


def test_flags_only_prints_the_table_and_writes_json_and_png(tmp_path):
    """The real entry point, as a user on a fresh clone runs it."""
    out, js = tmp_path / "plan", tmp_path / "rows.json"
    result = subprocess.run([sys.executable, "-m", "hvdtrain", "plan", *FLAGS, "--hierarchy", "2,8",
                             "--out", str(out), "--json", str(js)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for word in ("strategy", "samples/s", "efficiency", "horovod hier", "mpi k=16", "mpi hier 2,8",
                 "crossovers", "recommendations"):
        assert word in result.stdout, word
    data = json.loads(js.read_text())
    assert data == json.loads((out / "plan.json").read_text())
    assert len(data["rows"]) == 3 * 6  # horovod, horovod hier, ddp, mpi k=1, mpi k=16, mpi hier
    for row in data["rows"]:
        assert set(ROW_KEYS) <= set(row)
        assert 0 < row["efficiency"] <= 1 + 1e-9 and 0 <= row["comm_fraction"] < 1
    assert {r["nodes"] for r in data["rows"]} == {1, 2, 4} and data["meta"]["params"] == 25_000_000
    assert data["crossovers"] and len(data["recommendations"]) == 3
    assert (out / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "plan.md").is_file()


def test_plan_function_returns_rows():
    rows = plan(params=1_000_000, samples_per_second=500, nodes=[1, 2], sync_every=[1, 4],
                strategies=["horovod", "mpi"])
    assert [(r["strategy"], r["nodes"]) for r in rows] == [
        ("horovod", 1), ("mpi k=1", 1), ("mpi k=4", 1), ("horovod", 2), ("mpi k=1", 2), ("mpi k=4", 2)]
    one = next(r for r in rows if r["nodes"] == 1 and r["strategy"] == "horovod")
    assert one["efficiency"] == 1.0 and one["inter_bytes_per_step"] == 0 and one["ranks"] == 1


def test_options_reach_the_rows(capsys):
    assert main([*FLAGS, "--sync-every-seconds", "1.5", "--slow-rank-factor", "2", "--warmup-steps", "50",
                 "--outer-optimizer", "sgd", "--fp16", "--strategies", "horovod,mpi"]) == 0
    out = capsys.readouterr().out
    for word in ("mpi T=1.5s", "mpi k=16 warm-up 50", "mpi outer k=16"):
        assert word in out
    rows = plan(params=25_000_000, samples_per_second=200, nodes=(1, 2), slow_rank_factor=2.0, strategies=("horovod",))
    assert all(r["efficiency"] <= 0.5 + 1e-9 for r in rows)  # the synchronous strategy runs at the slow rank's pace


def test_model_is_counted_from_module_attr():
    rows = plan(model="mlp", model_args={"n_features": 10, "n_outputs": 1, "hidden": [100, 100]},
                samples_per_second=1000, nodes=(2,), strategies=("mpi",), sync_every=(1,))
    assert rows[0]["strategy"] == "mpi k=1"
    import hvdtrain.tools.plan as planmod
    result = planmod.build(model="hvdtrain.models:MLP",
                           model_args={"n_features": 10, "n_outputs": 1, "hidden": [100, 100]},
                           samples_per_second=1000, nodes=(1,))
    assert result.meta["params"] == 10 * 100 + 100 + 100 * 100 + 100 + 100 + 1 and result.meta["tensors"] == 6


def test_a_profile_is_read_and_flags_override(tmp_path, capsys):
    prof = P.new_profile()
    prof["links"]["intra"]["hvdtrain-mpi"] = {"alpha_us": 3.0, "gbit": 30.0}
    prof["links"]["inter"]["mpi4py"] = {"alpha_us": 80.0, "gbit": 2.0}
    prof["memcpy_gbps"] = 6.0
    path = tmp_path / "p.json"
    P.write_profile(prof, path)
    assert main(["--params", "1e6", "--samples-per-second", "500", "--nodes", "1,2", "--profile", str(path),
                 "--json", str(tmp_path / "a.json")]) == 0
    meta = json.loads((tmp_path / "a.json").read_text())["meta"]
    assert meta["links"]["mpi"]["intra"]["source"] == "profile hvdtrain-mpi" and meta["memcpy_gbps"] == 6.0
    assert meta["links"]["horovod"]["inter"]["source"] == "profile mpi4py"
    assert main(["--params", "1e6", "--samples-per-second", "500", "--nodes", "2", "--profile", str(path),
                 "--inter-gbit", "0.05", "--memcpy-gbps", "3", "--json", str(tmp_path / "b.json")]) == 0
    meta = json.loads((tmp_path / "b.json").read_text())["meta"]
    assert abs(meta["links"]["mpi"]["inter"]["gbit"] - 0.05) < 1e-9 and meta["memcpy_gbps"] == 3.0
    capsys.readouterr()


@pytest.mark.parametrize("argv,needle", [
    (["--inter-gbit", "-1"], "--inter-gbit -1"),
    (["--intra-latency-us", "-3"], "--intra-latency-us -3"),
    (["--nodes", "0"], "--nodes 0"),
    (["--nodes", "1,x"], "--nodes"),
    (["--ranks-per-node", "0"], "--ranks-per-node 0"),
    (["--strategies", "horovod,bogus"], "'bogus'"),
    (["--strategies", "single"], "'single'"),
    (["--sync-every", "0"], "--sync-every 0"),
    (["--hierarchy", "3,16"], "--hierarchy 3,16"),
    (["--slow-rank-factor", "0.5"], "--slow-rank-factor 0.5"),
    (["--link-efficiency", "2"], "--link-efficiency 2"),
    (["--bogus"], "--bogus"),
])
def test_bad_flags_are_one_line_and_exit_2(argv, needle, capsys):
    try:
        code = main(["--params", "1e6", "--samples-per-second", "100", *argv])
    except SystemExit as exc:  # argparse's own errors (hvdtrain.cli.Parser: one line, exit 2)
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvdtrain: error") and needle in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv,needle", [
    (["--samples-per-second", "100"], "no model"),
    (["--model", "nosuchmod_plan:Net", "--samples-per-second", "100"], "nosuchmod_plan"),
    (["--model", "resnet"], "neither MODULE:ATTR"),
    (["--params", "1e6"], "no compute"),
    (["--params", "0", "--samples-per-second", "100"], "--params 0"),
    (["--params", "1e6", "--profile", "/nonexistent/p.json"], "/nonexistent/p.json"),
])
def test_missing_or_bad_model_inputs_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvdtrain: error") and needle in lines[0], err


def test_help_names_the_flags():
    result = subprocess.run([sys.executable, "-m", "hvdtrain", "plan", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    for flag in ("--model", "--params", "--samples-per-second", "--measure", "--nodes", "--ranks-per-node",
                 "--inter-gbit", "--intra-latency-us", "--profile", "--calibrate", "--hosts", "--validate",
                 "--published", "--json", "--out", "--fp16", "--hierarchy", "--sync-every-seconds"):
        assert flag in result.stdout, flag


def test_published_prints_the_three_models(tmp_path, capsys):
    assert main(["--published", "--json", str(tmp_path / "pub.json")]) == 0
    out = capsys.readouterr().out
    for word in ("Inception V3", "ResNet-101", "VGG-16", "reported", "predicted"):
        assert word in out
    data = json.loads((tmp_path / "pub.json").read_text())
    assert data["inputs"]["servers"] == 128 and len(data["rows"]) == 3


def test_measure_times_the_model_here():
    import hvdtrain.tools.plan as planmod
    result = planmod.build(model="mlp", model_args={"n_features": 10, "n_outputs": 1, "hidden": [32]}, measure=True,
                           batch_size=8, measure_steps=1, nodes=(1, 2), strategies=("mpi",), sync_every=(1,))
    c = result.meta["compute"]
    assert c["how"] == "measured" and c["forward_s"] > 0 and c["backward_s"] > 0 and c["batch_size"] == 8
    assert result.meta["params"] == 10 * 32 + 32 + 32 + 1


@pytest.mark.parametrize("argv,needle", [
    (["--calibrate", "--calibrate-np", "1"], "--calibrate-np 1"),
    (["--calibrate", "--calibrate-np", "100000"], "use --calibrate-np <="),
    (["--calibrate", "--hosts", "only-one"], "names one host"),
    (["--calibrate", "--hosts", "a:b"], "HOST:SLOTS"),
    (["--validate", "--repeats", "0"], "--repeats 0"),
    (["--validate", "--hosts", "h1:0,h2"], "HOST:SLOTS"),
])
def test_calibrate_and_validate_check_their_flags_before_launching(argv, needle, capsys, monkeypatch):
    import hvdtrain.tools.launch as launch

    def refuse(*args, **kwargs):
        raise AssertionError(f"launched {args[0]}")
    monkeypatch.setattr(launch, "run", refuse)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_validate_runs_the_grid_interleaved_and_reports_errors(tmp_path, capsys, monkeypatch):
    """The driver with its jobs replaced (no launch): order, medians, errors, JSON."""
    from hvdtrain.tools.plan import model as M
    from hvdtrain.tools.plan import validate as V
    prof = P.new_profile()
    prof["links"]["intra"]["mpi4py"] = {"alpha_us": 2.0, "gbit": 40.0}
    prof["links"]["inter"]["mpi4py"] = {"alpha_us": 60.0, "gbit": 2.0}
    ran, shaped = [], []
    monkeypatch.setattr(P, "calibrate", lambda *a, **k: prof)
    monkeypatch.setattr(V, "model_compute", lambda name, *a, **k: (M.Compute(0.001, 0.002, 0.0005, 64), {"n": name}))
    monkeypatch.setattr(V, "shape_link", lambda gbit, label: shaped.append(label))

    def fake_run(argv, ranks, hosts, launcher, timeout, out):
        ran.append((argv[argv.index("--backend") + 1], hosts, out.parent.name))
        return {"samples_per_sec": 1000.0 + 10 * len(ran)}
    monkeypatch.setattr(V, "run_train", fake_run)
    assert main(["--validate", "--tiny", "--repeats", "2", "--hosts", "h1,h2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "validate.json").read_text())
    assert len(data["results"]) == 6 and len(ran) == 12 and shaped == ["unshaped", "unshaped", "unshaped"]
    assert [r[2] for r in ran[:3]] == [r[2] for r in ran[3:6]]  # one-host configs: A, B, C, A, B, C
    assert {r[1] for r in ran[6:]} == {"h1:1,h2:1"} and {r[1] for r in ran[:6]} == {None}
    for r in data["results"]:
        assert len(r["runs"]) == 2 and r["measured"] == sorted(r["runs"])[0] / 2 + sorted(r["runs"])[1] / 2
        assert abs(r["error"] - (r["predicted"] / r["measured"] - 1)) < 1e-12
    assert data["summary"]["measured"] == 6 and data["summary"]["median_abs_error"] is not None
    out = capsys.readouterr().out
    assert "median |error|" in out and "2 hosts unshaped mlp-tiny horovod" in out


def test_validate_calibrates_each_shaped_link_and_shares_the_host_for_one_host_compute(tmp_path, capsys, monkeypatch):
    """The full grid with its jobs replaced: every shaped link is calibrated under its shaping (the
    bench's rows are a ring at half the nominal rate here) and its rows are predicted from that fit;
    the one-host rows' compute comes from 2 one-rank runs at once, the two-host rows' from 1."""
    from hvdtrain.tools.plan import model as M
    from hvdtrain.tools.plan import validate as V
    prof = P.new_profile()
    prof["links"]["intra"]["mpi4py"] = {"alpha_us": 2.0, "gbit": 40.0}
    prof["links"]["inter"]["mpi4py"] = {"alpha_us": 60.0, "gbit": 2.0}
    benches, copies, shaping = [], [], {"now": None}
    monkeypatch.setattr(P, "calibrate", lambda *a, **k: prof)
    monkeypatch.setattr(V, "shape_link", lambda gbit, label: shaping.update(now=gbit))

    def fake_compute(name, hidden, out, timeout, repeats, tiny=False, copies_=1, **k):
        copies.append((name, k.get("copies", copies_)))
        return M.Compute(0.001, 0.002, 0.0005, 64), {"n": name}
    monkeypatch.setattr(V, "model_compute", fake_compute)

    def fake_bench(out, np, hosts, max_bytes, iters, timeout, impls):
        gbit = shaping["now"]
        benches.append((gbit, hosts, max_bytes, tuple(impls)))
        link = M.Link(100e-6, 8.0 / (0.5 * gbit * 1e9))      # half the nominal rate
        return [{"impl": i, "np": np, "bytes": n, "p50_us": 1e6 * M.ring_seconds(n, np, link), "busbw_gbps": 1.0}
                for i in impls for n in (4, 1 << 10, 1 << 16, 1 << 20, max_bytes)], {}
    monkeypatch.setattr(P, "run_bench", fake_bench)
    monkeypatch.setattr(V, "run_train", lambda argv, *a: {"samples_per_sec": 1000.0})
    assert main(["--validate", "--repeats", "1", "--hosts", "h1,h2", "--out", str(tmp_path)]) == 0
    assert [b[0] for b in benches] == [1.0, 0.2, 0.05] and {b[1] for b in benches} == {"h1:1,h2:1"}
    assert [b[2] for b in benches] == [16 << 20, 16 << 20, 4 << 20] and all("hvdtrain-mpi" in b[3] for b in benches)
    assert sorted(set(copies)) == [("mlp-1M", 1), ("mlp-1M", 2), ("mlp-20M", 1), ("mlp-20M", 2)]
    rows = {r["label"]: r for r in json.loads((tmp_path / "validate.json").read_text())["results"]}
    assert len(rows) == 30
    for rate, gbit in (("1gbit", 1.0), ("200mbit", 0.2), ("50mbit", 0.05)):
        fits = json.loads((tmp_path / f"profile-{rate}.json").read_text())["links"]["inter"]
        assert abs(fits["hvdtrain-mpi"]["gbit"] / (0.5 * gbit) - 1) < 1e-6, fits
        row = rows[f"2 hosts {rate} mlp-20M mpi k=1"]
        assert row["profile"] == rate
        # 80 MB each way at half the rate, plus the step's compute: the sync is the step here
        sync = 4 * (10 * 3162 + 3 * 3162 + 2 * 3162 * 3162 + 3162 + 1) * 8 / (0.5 * gbit * 1e9)
        assert 1.0 < 64 * 2 / row["predicted"] / sync < 1.01, (rate, 128 / row["predicted"], sync)


def test_unwritable_output_and_bad_profile_are_one_line(tmp_path, capsys):
    assert main(["--params", "1e6", "--samples-per-second", "100", "--json", "/proc/hvdtrain-plan/x.json"]) == 74
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write /proc/hvdtrain-plan" in err[0]
    bad = tmp_path / "bad.json"
    bad.write_text('{"links": {}}')
    assert main(["--params", "1e6", "--samples-per-second", "100", "--profile", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not an hvdtrain plan profile" in err[0]
