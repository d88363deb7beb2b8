# shellcheck shell=bash
# Shared by launch/slurm_single_node.sbatch and launch/slurm_multi_node.sbatch, which `source`
# it from the repository root (the batch shell's current folder by then). Defines functions only.
#
# How a preemption travels (the part these scripts exist for):
#
#   SLURM --signal=B:USR1@300 ...... SIGUSR1 to the batch shell only, 300 s before the time limit
#   batch shell (kd_run_training) .. traps it, `kill -USR1 <srun pid>`
#   srun ........................... forwards SIGUSR1 to every task of the step, on every node
#   launch/node_task.sh (per node) . relays SIGUSR1 to the training processes; the launcher
#                                    between them ignores it
#   kd_dist (every rank) ........... finishes its optimizer step, all ranks agree, save a
#                                    complete checkpoint, exit 75
#   node_task.sh ................... launcher said 1, the ranks recorded 75: exits 75
#   srun ........................... exits with the highest exit status of its tasks: 75
#   batch shell .................... 75: `scontrol requeue $SLURM_JOB_ID`; the requeued job runs
#                                    the same script, and --resume_from_checkpoint auto resumes
#
# Why SIGUSR1 is what gets forwarded, even when the batch shell itself got SIGTERM: srun turns a
# SIGTERM it receives into SIGKILL for all of its tasks ("srun: forcing job termination"), while
# it forwards SIGUSR1 unchanged. kd_dist treats SIGUSR1 and SIGTERM alike.
#
# What this cannot save: when SLURM itself ends the job (time limit reached, `scancel JOBID`, a
# preemption that kills), it sends SIGTERM to every process of the job, srun included, and srun
# kills its tasks at once. Only the early SIGUSR1 (or one sent by hand, see the sbatch scripts)
# leads to a clean checkpoint, so the @300 in --signal must cover one optimizer step plus writing
# a checkpoint.

# kd_use_python PYTHON: when PYTHON is a path (say /work/kd/.venv/bin/python), put its folder
# first on PATH, so that `accelerate` and `python` are that environment's on every node (srun
# passes the environment on). A bare name ("python") leaves PATH alone.
kd_use_python() {
    local python=$1
    if [[ $python == */* ]]; then
        if [[ ! -x $python ]]; then
            echo "error: PYTHON=$python is not an executable file" >&2
            return 1
        fi
        PATH="$(cd "$(dirname "$python")" && pwd):$PATH"
        export PATH
    fi
    if ! command -v accelerate >/dev/null; then
        echo "error: no \`accelerate\` on PATH; set PYTHON to the interpreter of the environment" \
            "kd_dist is installed in (e.g. PYTHON=\$PWD/.venv/bin/python)" >&2
        return 1
    fi
}

# kd_check_config CONFIG: the accelerate config exists (relative to the repository root).
kd_check_config() {
    if [[ ! -f $1 ]]; then
        echo "error: accelerate config $1 not found (relative paths are relative to the" \
            "repository root, $PWD)" >&2
        return 1
    fi
}

# kd_srun_options: the srun options both scripts use, in the array KD_SRUN_OPTIONS.
#   --nodes / --ntasks-per-node=1: one task per node, the launcher, which starts one training
#       process per GPU itself.
#   --kill-on-bad-exit=0: a node whose training processes exit (say with 75 after saving) must
#       not get the other nodes' tasks killed while they are still finishing their part of the
#       checkpoint (some clusters default to 1 in slurm.conf).
#   --cpus-per-task: passed on explicitly because srun does not take sbatch's over in every
#       Slurm version (22.05 stopped doing so); the one task needs the cores of all training
#       processes and their data loaders.
# The step gets all of the job's GPUs on each node (srun's default for a job's GRES).
kd_srun_options() {
    KD_SRUN_OPTIONS=(--nodes="${SLURM_NNODES:-1}" --ntasks-per-node=1 --kill-on-bad-exit=0)
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
        KD_SRUN_OPTIONS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    fi
}

# kd_run_training SRUN_ARGS...: runs `srun SRUN_ARGS...` in the background, forwards SIGUSR1 and
# SIGTERM to it as SIGUSR1, waits for it, and on exit status 75 requeues the job. Does not
# return: exits the batch script with srun's status (0 after a successful requeue).
kd_run_training() {
    echo "kd_dist: job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}," \
        "start #$((${SLURM_RESTART_COUNT:-0} + 1)); srun $*" >&2

    # srun runs in the background so that the batch shell can take signals while it runs: bash
    # runs a trap only between commands, so with srun in the foreground a trapped signal would
    # wait until srun had finished.
    srun "$@" &
    KD_SRUN_PID=$!
    KD_SIGNALLED=0
    trap 'kd_forward_signal USR1' USR1
    trap 'kd_forward_signal TERM' TERM

    # A trapped signal makes `wait` return at once (status 128 + signal) while srun keeps
    # running: wait again for its real exit status (bash keeps a finished child's status).
    local status
    while :; do
        KD_SIGNALLED=0
        status=0
        wait "$KD_SRUN_PID" || status=$?
        ((KD_SIGNALLED)) || break
    done
    trap - USR1 TERM

    if ((status == 75)); then
        echo "kd_dist: training stopped after saving a checkpoint (exit status 75);" \
            "requeueing job $SLURM_JOB_ID" >&2
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        echo "kd_dist: scontrol requeue failed (is requeueing allowed on this cluster?);" \
            "submit the same script again to continue from the checkpoint" >&2
        exit 75
    fi
    echo "kd_dist: training exited with status $status" >&2
    exit "$status"
}

# The batch shell's trap: pass the request on to the training step as SIGUSR1 (see above for
# why never SIGTERM). `kill` on srun's pid works on the local node and needs no step id; srun
# then forwards the signal to the step's tasks on all nodes.
kd_forward_signal() {
    KD_SIGNALLED=1
    echo "kd_dist: batch shell got SIG$1; forwarding SIGUSR1 to the training step" \
        "(srun pid $KD_SRUN_PID)" >&2
    kill -USR1 "$KD_SRUN_PID" 2>/dev/null || true
}
