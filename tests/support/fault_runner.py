"""Runs the real `hvdtrain` CLI in a rank with one fault injected into one rank.

usage: python -m mpi4py tests/support/fault_runner.py MODE RANK STEP -- <hvdtrain args>
MODE: raise (an exception after STEP) | stall (sleeps forever after STEP) | exit (os._exit(7))
"""
import os
import sys
import time

from hvdtrain import cli
from hvdtrain.strategies import base

mode, fault_rank, fault_step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
argv = sys.argv[sys.argv.index("--") + 1:]


def inject(original):
    def after_step(self, step, model):
        synced = original(self, step, model)
        if self.rank == fault_rank and step == fault_step:
            if mode == "raise":
                raise RuntimeError(f"injected fault on rank {self.rank} at step {step}")
            if mode == "stall":
                time.sleep(10 ** 6)
            if mode == "exit":
                os._exit(7)
        return synced
    return after_step


classes = [base.SyncStrategy]
if "--backend" in argv and argv[argv.index("--backend") + 1] == "mpi":
    from hvdtrain.strategies.mpi_average import MPIAverage
    classes.append(MPIAverage)
for cls in classes:
    if "after_step" in cls.__dict__:
        cls.after_step = inject(cls.__dict__["after_step"])

sys.exit(cli.main(argv))
