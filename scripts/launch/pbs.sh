#!/bin/bash
# Argonne on PBS Pro (e.g. ALCF Polaris: 4 GPUs per node): one torchrun per node through mpiexec.
#   qsub -l select=2:system=polaris -v CONFIG=configs/small.toml scripts/launch/pbs.sh
#PBS -N argonne
#PBS -l walltime=24:00:00
#PBS -l filesystems=home:eagle
#PBS -j oe
set -euo pipefail
cd "$PBS_O_WORKDIR"
NNODES=$(sort -u "$PBS_NODEFILE" | wc -l)
HEAD_NODE=$(head -n 1 "$PBS_NODEFILE")
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
source .venv/bin/activate
# PBS sends SIGTERM at the walltime limit (after kill_delay): Argonne finishes the step, saves and exits 0.
mpiexec -n "$NNODES" --ppn 1 torchrun \
    --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$HEAD_NODE:29500" --rdzv-id "$PBS_JOBID" \
    -m argonne train "${CONFIG:?pass -v CONFIG=...}" --resume auto
