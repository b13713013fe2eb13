#!/bin/bash
# Continual training on SLURM: each job trains the next period, then submits the job for the
# one after (--dependency=afterok); at the time limit or on preemption it checkpoints and
# requeues itself; when every period is done it writes <run>/report.md and report.png.
#
#   PESO_CONFIG=configs/paper.yaml PESO_DATA=data/cds PESO_RUN=runs/cds-peso \
#       sbatch --nodes=1 --ntasks-per-node=4 --gpus-per-node=4 slurm/continual.sh
#   sbatch --nodes=2 --time=6:00:00 --export=ALL,PESO_CONFIG=configs/paper.yaml,PESO_DATA=data/cds,PESO_RUN=runs/cds,PESO_OVERRIDES=schedule.global_batch_size=128 slurm/continual.sh
#
# The ranks (nodes x tasks per node) must divide the config's global batch into micro-batches:
# paper.yaml's 32 at 8 per rank fits 1, 2 or 4 ranks; the 16 ranks below need a batch of 128.
#
# Every #SBATCH line below can be overridden on the sbatch command line, each by the same option
# only: `--gpus=16` keeps --gpus-per-node=8 below (add --gpus-per-node=0 for --gpus, --gres or
# --gpus-per-task alone); --cpus-per-gpu needs a copy without --cpus-per-task (SLURM refuses both).
# Each next job asks for what this one had, from its `scontrol show job` record (docs/slurm.md).
# Settings (environment):
#   PESO_CONFIG     experiment YAML (configs/*.yaml)                                [required]
#   PESO_DATA       dataset folder (python -m data_tools convert / index)          [required]
#   PESO_RUN        run folder (state.json, periods, TensorBoard)                   [required]
#   PESO_DS_CONFIG  DeepSpeed config                       [ds_configs/zero3.json]
#   PESO_OVERRIDES  dotted overrides, space-separated      [none], e.g. "optim.lr=1e-4 method.lam=2"
#   PESO_REPO       this repository on the nodes            [the submit directory]
#   PESO_PYTHON     interpreter                             [PESO_REPO/.venv/bin/python, else python3]
# A required setting missing: exit 2 with a message naming it. A failed period stops the chain
# with a message; submitting the same command again continues from that period (finished
# periods are never repeated).
#SBATCH --job-name=peso-continual
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=peso-continual-%j.out
set -uo pipefail

cd "${PESO_REPO:-$SLURM_SUBMIT_DIR}" || exit 1
if [ -z "${PESO_PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PESO_PYTHON=.venv/bin/python; else PESO_PYTHON=python3; fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# The launcher runs in the background so that this shell can take SLURM's signal (sent to the
# batch script only: --signal=B:...) and pass it on; the launcher asks every rank to checkpoint.
"$PESO_PYTHON" -m launcher slurm-step &
launcher=$!
trap 'kill -USR1 "$launcher" 2>/dev/null' USR1 TERM
while true; do
    wait "$launcher"
    rc=$?
    kill -0 "$launcher" 2>/dev/null || break   # `wait` also returns when a trapped signal arrives
done
exit "$rc"
