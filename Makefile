# hvdtrain: the README's two commands are `make run` and `make test`; each installs what it needs.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
NP ?= 2
OUT ?= runs/default

.PHONY: install run test test-fast bench compare clean-runs

install:
	@bash mpi_jobs/install.sh

# The default job: built-in regression set, $(NP) ranks, Horovod allreduce then the MPI fallback.
run: install
	$(PY) -m hvdtrain compare --np $(NP) --out $(OUT) --rows 100000 --sync-every 1,16 --epochs 1 --batch-size 64 --lr 0.01

test: install
	$(PY) -m pytest

# Plain-pytest part only (no launched multi-rank jobs).
test-fast: install
	$(PY) -m pytest -m "not mpi"

clean-runs:
	rm -rf runs
