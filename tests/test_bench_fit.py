"""`hvdtrain bench fit` on tiny settings: a table, well-formed JSON, sane values."""
from __future__ import annotations

import json
import math
import subprocess
import sys

from hvdtrain.launch import launcher_env


def test_bench_fit_tiny(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hvdtrain", "bench", "fit", "--out", str(tmp_path),
                             "--epochs", "1", "--repeats", "1"], capture_output=True, text=True, timeout=300,
                            env=launcher_env())
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "fit.json").read_text())
    rows = {r["loop"]: r for r in data["rows"]}
    assert set(rows) == {"plain torch", "hvdtrain.fit (single)"}
    for r in rows.values():
        assert math.isfinite(r["samples_per_sec"]) and r["samples_per_sec"] > 0 and 0 <= r["eval_accuracy"] <= 1
        assert r["runs"][0]["steps"] == 1437 // 32  # one epoch of full batches of the digits train split
    assert rows["plain torch"]["vs_plain"] == 1.0
    assert data["meta"]["machine"]["versions"]["torch"]
    assert "vs plain" in result.stdout


def test_bench_fit_bad_argument():
    result = subprocess.run([sys.executable, "-m", "hvdtrain", "bench", "fit", "--repeats", "0"],
                            capture_output=True, text=True, timeout=60, env=launcher_env())
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "--repeats" in result.stderr
