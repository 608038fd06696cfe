"""`hvdtrain bench KIND`: benchmarks that print a table and write JSON (and a plot).

Each kind is a tool module with its own parser (`hvdtrain bench KIND --help`); this module only
lists them and dispatches.
"""
from __future__ import annotations

import importlib
import sys

#: kind -> (tool module, one line for `hvdtrain bench --help`)
KINDS: dict[str, tuple[str, str]] = {
    "allreduce": ("hvdtrain.tools.bench_allreduce",
                  "float32 SUM allreduce in place per implementation (raw MPI, hvdtrain, Horovod, gloo)"),
    "train": ("hvdtrain.tools.bench_train",
              "`hvdtrain train` per strategy at 1..N ranks: throughput, bytes, memory"),
    "synthetic": ("hvdtrain.tools.bench_synthetic",
                  "img/s of a real model under every strategy and hand-written loops"),
    "convergence": ("hvdtrain.tools.bench_convergence",
                    "held-out loss over time: the MPI fallback's variants against Horovod"),
    "fit": ("hvdtrain.tools.bench_fit", "1-rank cost of hvdtrain.fit against a plain torch loop"),
}
USAGE = f"usage: hvdtrain bench {{{','.join(KINDS)}}} [options]"


def help_text() -> str:
    width = max(len(k) for k in KINDS)
    lines = [USAGE, "", __doc__.split("\n")[0].strip('"'), "", "kinds:"]
    lines += [f"  {kind.ljust(width)}  {about}" for kind, (_, about) in KINDS.items()]
    lines += ["", "Run `hvdtrain bench KIND --help` for the options of one kind."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        sys.stdout.write(help_text())
        return 0
    if not argv or argv[0] not in KINDS:
        got = repr(argv[0]) if argv else "nothing"
        sys.stderr.write(f"hvdtrain: error: bench needs a kind, got {got}; use `hvdtrain bench "
                         f"{'|'.join(KINDS)} --np N --out DIR` (see `hvdtrain bench --help`)\n")
        return 2
    return int(importlib.import_module(KINDS[argv[0]][0]).main(argv[1:]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
