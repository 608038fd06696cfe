"""`hvdtrain bench allreduce|train|fit`: benchmarks that print a table and write JSON (and a plot)."""
from __future__ import annotations

import importlib
import sys

KINDS = {"allreduce": "hvdtrain.bench_allreduce", "train": "hvdtrain.bench_train", "fit": "hvdtrain.bench_fit",
         "synthetic": "hvdtrain.bench_synthetic", "convergence": "hvdtrain.bench_convergence"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in KINDS:
        got = repr(argv[0]) if argv else "nothing"
        sys.stderr.write(f"hvdtrain: error: bench needs a kind, got {got}; use `hvdtrain bench "
                         f"{'|'.join(KINDS)} --np N --out DIR`\n")
        return 2
    return int(importlib.import_module(KINDS[argv[0]]).main(argv[1:]))
