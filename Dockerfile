# hvdtrain image: CUDA + cuDNN development base, Open MPI, NCCL, a CUDA build of torch,
# Horovod 0.28.1 with NCCL GPU operations, and hvdtrain; it runs as the non-root user `hvd`.
# Everything Python is installed by mpi_jobs/install.sh, the same step as a local install.
#
#   docker build -t hvdtrain .
#   docker run --rm --gpus all --shm-size=1g hvdtrain horovodrun -np 4 hvdtrain train ...
#   docker run --rm hvdtrain hvdtrain --help
#
# BASE_IMAGE and the torch wheel (TORCH_INDEX_URL, HVDTRAIN_TORCH_SPEC) must be built for the
# same CUDA major version; the build checks it and fails with the fix if they differ.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
FROM ${BASE_IMAGE}

# 1 = Horovod with HOROVOD_GPU_OPERATIONS=NCCL (needs nvcc and NCCL from the base image).
ARG HVDTRAIN_WITH_NCCL=1
ARG HVDTRAIN_TORCH_SPEC=torch==2.13.0
# Extra pip index that serves CUDA builds of torch; empty = PyPI only.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# GPU architectures Horovod's CUDA kernels are compiled for (PTX for the last one).
ARG HOROVOD_BUILD_CUDA_CC_LIST=70,75,80,86,89,90
# pip settings for the install steps only, for files mounted into the build: a directory of
# local wheels, and a CA bundle (builders behind a TLS-inspecting proxy); empty = none.
ARG HVDTRAIN_PIP_FIND_LINKS=""
ARG HVDTRAIN_PIP_CERT=""
# uid of `hvd`; match it to the host user that owns mounted data and output directories.
ARG HVD_UID=1000

LABEL org.opencontainers.image.title="hvdtrain" \
      org.opencontainers.image.description="Data-parallel PyTorch training over MPI: Horovod (NCCL) or mpi4py parameter averaging" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# What install.sh needs from the system (it apt-installs only as root, and the image installs as
# `hvd`): Open MPI, a C++ toolchain, cmake 3.x, Python with venv and headers (mpi4py and Horovod
# compile against them). openssh-client lets mpirun start ranks on other hosts. NCCL's headers
# and static library come with the CUDA devel images; fetch them from the base's CUDA apt
# repository if a base lacks them.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates cmake g++ make libopenmpi-dev openmpi-bin openssh-client \
      python3 python3-dev python3-venv \
 && if [ "$HVDTRAIN_WITH_NCCL" = 1 ] && [ ! -e /usr/include/nccl.h ]; then \
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libnccl-dev; \
    fi \
 && rm -rf /var/lib/apt/lists/*

# The non-root user. Ubuntu 24.04 images already hold uid 1000 (`ubuntu`): hand it over.
RUN old_user="$(getent passwd "$HVD_UID" | cut -d: -f1 || true)" \
 && if [ -n "$old_user" ]; then userdel --remove "$old_user" 2>/dev/null || userdel "$old_user"; fi \
 && useradd --create-home --uid "$HVD_UID" --shell /bin/bash hvd \
 && install -d -o hvd -g hvd /opt/hvdtrain /workspace

# Open MPI's shared-memory transport uses cross-memory attach (CMA) for large messages; the
# default container seccomp profile forbids process_vm_readv, so ranks would fail on it. Set
# here, once, for every process of the image (the entrypoint, `docker exec`, --entrypoint).
ENV HVDTRAIN_VENV=/opt/hvdtrain/venv \
    PATH=/opt/hvdtrain/venv/bin:${PATH} \
    OMPI_MCA_btl_vader_single_copy_mechanism=none \
    PYTHONUNBUFFERED=1

USER ${HVD_UID}
WORKDIR /opt/hvdtrain/src

# torch, numpy, pytest, mpi4py, Horovod and an editable hvdtrain, from only the files the install
# reads, so that editing hvdtrain's modules does not rebuild Horovod.
COPY --chown=hvd:hvd setup.cfg pyproject.toml* setup.py* README.md* ./
COPY --chown=hvd:hvd hvdtrain/__init__.py hvdtrain/
COPY --chown=hvd:hvd mpi_jobs/install.sh mpi_jobs/
RUN if [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi \
 && if [ -n "$HVDTRAIN_PIP_FIND_LINKS" ]; then export PIP_FIND_LINKS="$HVDTRAIN_PIP_FIND_LINKS"; fi \
 && if [ -n "$HVDTRAIN_PIP_CERT" ]; then export PIP_CERT="$HVDTRAIN_PIP_CERT"; fi \
 && HVDTRAIN_CACHE=/tmp/hvdtrain-cache PIP_NO_CACHE_DIR=1 bash mpi_jobs/install.sh \
 && rm -rf /tmp/hvdtrain-cache

COPY --chown=hvd:hvd . ./

# Re-running install.sh on the full tree must change nothing; then Horovod reports its build.
RUN if [ -n "$HVDTRAIN_PIP_CERT" ]; then export PIP_CERT="$HVDTRAIN_PIP_CERT"; fi \
 && bash mpi_jobs/install.sh \
 && horovodrun --check-build | tee /tmp/check-build.txt \
 && grep -q '\[X\] PyTorch' /tmp/check-build.txt && grep -q '\[X\] MPI' /tmp/check-build.txt \
 && if [ "$HVDTRAIN_WITH_NCCL" = 1 ]; then \
      grep -q '\[X\] NCCL' /tmp/check-build.txt \
      && python -c 'import re, subprocess, torch; nvcc = re.search(r"release (\d+)", subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=True).stdout).group(1); have = (torch.version.cuda or "none").split(".")[0]; assert have == nvcc, f"torch {torch.__version__} (CUDA {torch.version.cuda}) does not match the base image (CUDA {nvcc}): set TORCH_INDEX_URL and HVDTRAIN_TORCH_SPEC to a CUDA {nvcc} torch, or a BASE_IMAGE with CUDA {torch.version.cuda}"'; \
    fi \
 && rm /tmp/check-build.txt \
 && hvdtrain --help >/dev/null

WORKDIR /workspace
ENTRYPOINT ["bash", "/opt/hvdtrain/src/mpi_jobs/docker_entrypoint.sh"]
CMD ["hvdtrain", "--help"]
