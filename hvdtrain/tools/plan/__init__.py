"""`hvdtrain plan`: predict one training step, samples/s and scaling of every strategy on a
cluster, from an alpha-beta(-gamma) model (model.py) of its collectives and their overlap.

    hvdtrain plan --params 25e6 --samples-per-second 200 --batch-size 64 --nodes 1,2,4,8 \\
        --ranks-per-node 4 --inter-gbit 10 --out plan/
    hvdtrain plan --model mypkg.models:Net --model-args '{"width": 512}' --measure --profile p.json
    hvdtrain plan --calibrate [--hosts "$HOSTS"] --profile-out p.json   # bench allreduce, fitted
    hvdtrain plan --published     # the model against Horovod's 512-GPU benchmark (published.py)
    hvdtrain plan --validate [--tiny] --hosts "$HOSTS"   # real jobs on the local cluster (validate.py)

From a notebook: `from hvdtrain.tools.plan import plan; rows = plan(params=25e6, ...)` takes the
flags as keywords (underscores) and returns the rows as dicts; `build(...)` also returns the
crossovers and recommendations.

Inputs (inputs.py, profile.py): the model's parameter tensors (counted from --model, or --params),
one rank's compute (--samples-per-second and --batch-size, --measure, or a profile's), the links
(flags, a calibrated profile, or defaults). Strategies: the registry's multi-rank ones
(`--strategies horovod,ddp,mpi`), as rows: `horovod` (flat), `horovod hier` (with more than one
rank per node), `ddp`, `mpi k=K` per --sync-every, and with their flags `mpi hier KL,KG`,
`mpi outer k=K`, `mpi k=K warm-up W`, `mpi T=Ts` (time-based). --slow-rank-factor slows one rank
in every row.
"""
from __future__ import annotations

from hvdtrain.tools.plan.cli import main
from hvdtrain.tools.plan.core import Options, Result, build, plan

__all__ = ["plan", "build", "main", "Options", "Result"]
