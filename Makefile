# hvdtrain: the README's two commands are `make run` and `make test`; each installs what it needs.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
NP ?= 2
OUT ?= runs/default

.PHONY: install run test test-fast bench-allreduce bench-train doctor docker-smoke docker-lint slurm-up slurm-down test-slurm clean-runs cluster-up cluster-down bench-fit

install:
	@bash mpi_jobs/install.sh

# The default job: the digits CNN example on $(NP) ranks under every strategy (Horovod, the MPI
# fallback at k=1 and k=8, DDP), side by side, with plots in $(OUT).
run: install
	$(PY) -m hvdtrain compare --np $(NP) --out $(OUT) --model hvdtrain.examples.digits_cnn:DigitsCNN \
	  --data hvdtrain.examples.digits_cnn:digits_datasets --optimizer adam --lr 0.003 --epochs 4 \
	  --batch-size 32 --sync-every 1,8

test: install
	$(PY) -m pytest

# Plain-pytest part only (no launched multi-rank jobs).
test-fast: install
	$(PY) -m pytest -m "not mpi"

bench-allreduce: install
	$(PY) -m hvdtrain bench allreduce --np $(NP) --out runs/bench

bench-train: install
	$(PY) -m hvdtrain bench train --np $(NP) --out runs/bench

doctor: install
	$(PY) -m hvdtrain doctor

# Smoke build of the Dockerfile's steps with buildah on a local Debian base (not the CUDA image; root).
docker-smoke:
	bash mpi_jobs/docker_smoke.sh

docker-lint: install
	$(VENV)/bin/hadolint Dockerfile

# A single-node Slurm (slurmctld + slurmd) on this machine, as the tests start it (root).
slurm-up:
	bash mpi_jobs/slurm_local.sh start

slurm-down:
	bash mpi_jobs/slurm_local.sh stop

test-slurm: install
	$(PY) -m pytest tests/test_slurm.py -q

# A local cluster of N network-namespace hosts with sshd (root); then `source` the env file it names.
cluster-up:
	bash mpi_jobs/cluster_local.sh up $(or $(N),2) >/dev/null && echo "now: source $${HVDTRAIN_CLUSTER_DIR:-/tmp/hvdtrain-cluster}/env"

cluster-down:
	bash mpi_jobs/cluster_local.sh down

bench-fit: install
	$(PY) -m hvdtrain bench fit --out runs/bench

clean-runs:
	rm -rf runs
