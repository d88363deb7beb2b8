#!/usr/bin/env bash
# kd_dist on this machine, with one process per GPU when there are several.
#
#   launch/local.sh [--config accelerate_configs/X.yaml] [--gpus N] [--dry-run] -- TRAIN FLAGS...
#
#   launch/local.sh -- --teacher_model gpt2-large --student_model distilgpt2 \
#       --dataset ./data.jsonl --output_dir ./distilled --bf16
#   launch/local.sh --config accelerate_configs/deepspeed_zero3.yaml -- ...
#
# With 0 or 1 GPU and no --config:  PYTHON -m kd_dist train FLAGS...
# Otherwise:  accelerate launch --config_file CONFIG --num_processes N -m kd_dist train FLAGS...
#             (CONFIG defaults to accelerate_configs/multi_gpu.yaml, DDP; N to the GPU count)
#
# Options (before the "--"; everything after it goes to `kd-dist train`):
#   --config FILE  accelerate config, see accelerate_configs/ (relative to the repository root)
#   --gpus N       number of GPUs, i.e. processes. Default: the entries of CUDA_VISIBLE_DEVICES
#                  when it is set, else the GPUs `nvidia-smi -L` lists, else 0
#   --dry-run      print the command instead of running it
# Environment:
#   PYTHON         interpreter that has kd_dist installed (default: python). When it is a path
#                  and an `accelerate` sits next to it, that one is used too.
#
# The command runs from the repository root (the DeepSpeed JSON paths inside the accelerate
# configs are relative to it), so relative paths in the flags are relative to the repository
# root as well. The exit status is the command's: 75 means "stopped on SIGTERM/SIGUSR1 after
# saving a checkpoint; run again with --resume_from_checkpoint auto to continue" (under
# `accelerate launch`, which reports any failing process as 1, it shows as 1).
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

die() {
    echo "launch/local.sh: error: $*" >&2
    echo "usage: launch/local.sh [--config FILE] [--gpus N] [--dry-run] -- TRAIN FLAGS..." >&2
    exit 2
}

config=""
gpus=""
dry_run=0
while (($# > 0)); do
    case $1 in
    --config)
        (($# >= 2)) || die "--config needs a file"
        config=$2
        shift 2
        ;;
    --config=*)
        config=${1#*=}
        shift
        ;;
    --gpus)
        (($# >= 2)) || die "--gpus needs a number"
        gpus=$2
        shift 2
        ;;
    --gpus=*)
        gpus=${1#*=}
        shift
        ;;
    --dry-run)
        dry_run=1
        shift
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    --)
        shift
        break
        ;;
    *)
        die "unknown option '$1' (kd-dist train flags go after a '--')"
        ;;
    esac
done
# "$@" now holds the kd-dist train flags.

if [[ -z $gpus ]]; then
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
        # Only the visible GPUs count ("" hides them all, "0,1" shows two).
        IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
        gpus=${#visible[@]}
    elif command -v nvidia-smi >/dev/null; then
        # One "GPU 0: NVIDIA H100 ... (UUID: ...)" line per GPU; grep -c prints 0 on no match.
        gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    else
        gpus=0
    fi
fi
[[ $gpus =~ ^[0-9]+$ ]] || die "--gpus must be a whole number, not '$gpus'"

# The repository root: the folder above this script's own folder.
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

python=${PYTHON:-python}
if ((gpus <= 1)) && [[ -z $config ]]; then
    command=("$python" -m kd_dist train "$@")
else
    config=${config:-accelerate_configs/multi_gpu.yaml}
    [[ -f $config ]] || die "accelerate config '$config' not found (relative to $repo_root)"
    accelerate=accelerate
    if [[ $python == */* && -x "$(dirname "$python")/accelerate" ]]; then
        accelerate="$(dirname "$python")/accelerate"
    fi
    # With --config on a machine without GPUs, one process (accelerate needs at least one).
    command=("$accelerate" launch --config_file "$config" --num_processes "$((gpus > 0 ? gpus : 1))"
        -m kd_dist train "$@")
fi

if ((dry_run)); then
    # Shell-quoted, so that the line can be pasted back into a shell.
    printf -v line '%q ' "${command[@]}"
    echo "${line% }"
    exit 0
fi
exec "${command[@]}"
