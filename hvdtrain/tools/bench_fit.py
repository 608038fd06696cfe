"""`hvdtrain bench fit`: the 1-rank cost of `hvdtrain.fit` against a plain torch loop on the same
model, Dataset, batches and threads (the digits CNN by default). Both run in this process,
alternating, `--repeats` times each; samples/s counts the training loop only (setup excluded),
and the median is reported. Writes OUT/fit.json and prints a table."""
from __future__ import annotations

import functools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from hvdtrain.tools import tables
from hvdtrain.checkpoint import atomic_write_text
from hvdtrain.tools.launch import ends_its_jobs

COLUMNS = [("loop", "loop", "{}"), ("samples/s (median)", "samples_per_sec", "{:.0f}"),
           ("min", "min", "{:.0f}"), ("max", "max", "{:.0f}"), ("vs plain", "vs_plain", "{:.3f}"),
           ("eval acc", "eval_accuracy", "{:.4f}")]


def plain_loop(model: Any, train: Any, evald: Any, epochs: int, batch: int, lr: float, seed: int) -> dict[str, Any]:
    """What a user writes without hvdtrain: DataLoader(shuffle), Adam, cross-entropy."""
    import torch
    from torch import nn
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True, drop_last=True, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    steps = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            steps += 1
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        x, y = next(iter(torch.utils.data.DataLoader(evald, batch_size=len(evald))))
        acc = float((model(x).argmax(1) == y).float().mean())
    return {"samples_per_sec": steps * batch / seconds, "eval_accuracy": acc, "steps": steps}


def fit_loop(model: Any, train: Any, evald: Any, epochs: int, batch: int, lr: float, seed: int,
             threads: int) -> dict[str, Any]:
    import torch

    import hvdtrain
    with tempfile.TemporaryDirectory(prefix="hvdtrain-bench-fit-") as out:
        s = hvdtrain.fit(model, train, evald, optimizer=functools.partial(torch.optim.Adam, lr=lr),
                         backend="single", epochs=epochs, batch_size=batch, seed=seed, threads=threads,
                         out=out, log_every=50)
    assert s is not None
    return {"samples_per_sec": s["samples_per_sec"], "eval_accuracy": s["eval_accuracy"], "steps": s["steps"]}


@ends_its_jobs("hvdtrain bench fit")
def main(argv: list[str]) -> int:
    from hvdtrain.tools.machine import machine
    from hvdtrain.cli import Parser
    p = Parser(prog="hvdtrain bench fit", description=__doc__)
    p.add_argument("--out", default="runs/bench-fit", help="folder for fit.json")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    import torch

    from hvdtrain.examples.digits_cnn import DigitsCNN, digits_datasets
    torch.set_num_threads(args.threads)
    train, evald = digits_datasets()
    runs: dict[str, list[dict[str, Any]]] = {"plain torch": [], "hvdtrain.fit (single)": []}
    for r in range(args.repeats):
        torch.manual_seed(r)
        runs["plain torch"].append(plain_loop(DigitsCNN(), train, evald, args.epochs, args.batch_size, args.lr, r))
        torch.manual_seed(r)
        runs["hvdtrain.fit (single)"].append(fit_loop(DigitsCNN(), train, evald, args.epochs, args.batch_size,
                                                      args.lr, r, args.threads))
    rows = []
    for loop, results in runs.items():
        rates = [x["samples_per_sec"] for x in results]
        rows.append({"loop": loop, "samples_per_sec": statistics.median(rates), "min": min(rates),
                     "max": max(rates), "eval_accuracy": statistics.median(x["eval_accuracy"] for x in results),
                     "runs": results})
    for row in rows:
        row["vs_plain"] = row["samples_per_sec"] / rows[0]["samples_per_sec"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": "hvdtrain.examples.digits_cnn:DigitsCNN", "data": "digits (1437 train, 360 eval)",
            **{k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "repeats", "threads")},
            "machine": machine()}
    atomic_write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n", out / "fit.json")
    print(f"digits CNN, 1 process, batch {args.batch_size}, {args.threads} thread(s), {args.repeats} repeats")
    print(tables.format_table(COLUMNS, rows))
    print(f"\nwrote {out}/fit.json")
    return 0
