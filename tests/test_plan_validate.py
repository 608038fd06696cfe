"""`hvdtrain plan --validate --tiny` end to end on this host (CI's tiny version of the grid): the
calibration (bench allreduce) and the compute measurement run, every configuration is trained
`--repeats` times by real mpirun/horovodrun jobs, and the JSON's errors are what its predicted and
measured samples/s say. Not a timed test: the model's accuracy is the README's full grid."""
from __future__ import annotations

import json
import statistics
import sys

import pytest

from support import jobs


@pytest.mark.mpi
def test_tiny_validate_runs_every_config_and_reports_its_error(tmp_path):
    out = tmp_path / "validate"
    result = jobs.run_job([sys.executable, "-m", "hvdtrain", "plan", "--validate", "--tiny", "--repeats", "2",
                           "--timeout", "240", "--out", str(out)], timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    data = json.loads((out / "validate.json").read_text())
    rows = data["results"]
    # --tiny on one host: horovod, mpi k=1 and mpi k=4, each 2 ranks here
    assert sorted(r["config"]["strategy"] for r in rows) == ["horovod", "mpi k=1", "mpi k=4"]
    assert all(r["config"]["hosts"] == 1 for r in rows)
    for r in rows:
        assert r["nruns"] == 2 and len(r["runs"]) == 2 and all(v > 0 for v in r["runs"]), r
        assert r["measured"] == pytest.approx(statistics.median(r["runs"]), rel=1e-12)
        assert r["predicted"] > 0 and r["error"] == pytest.approx(r["predicted"] / r["measured"] - 1, rel=1e-9)
        assert abs(r["error"]) < 3, f"{r['label']}: predicted {r['predicted']:.0f}, measured {r['measured']:.0f}"
        assert r["label"] in result.stdout
    errors = [abs(r["error"]) for r in rows]
    assert data["summary"]["median_abs_error"] == pytest.approx(statistics.median(errors), rel=1e-9)
    assert data["summary"]["worst_abs_error"] == pytest.approx(max(errors), rel=1e-9)
    profile = json.loads((out / "profile.json").read_text())
    intra = profile["links"]["intra"]
    assert intra and all(fit["gbit"] > 0 and fit["alpha_us"] >= 0 for fit in intra.values()), intra
