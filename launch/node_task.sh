#!/usr/bin/env bash
# What the SLURM scripts run on every node, as the one task that `srun` starts there:
#
#   launch/node_task.sh LAUNCHER [ARGS...]       e.g. launch/node_task.sh accelerate launch ...
#
# Not meant to be run by hand. It does three things around the launcher:
#
# 1. The launcher runs with SIGUSR1 and SIGTERM *ignored*. SLURM may deliver a signal to every
#    process of the step (srun forwards SIGUSR1 to the step, and with proctrack/cgroup slurmstepd
#    signals every process in the step's cgroup, launcher included). The default action of
#    SIGUSR1 is to terminate, and neither `accelerate launch` nor torch's elastic agent handles
#    it: without this the launcher would die at once and take the training processes with it.
#    "Ignored" is inherited through fork and exec, so the training processes start with it too,
#    but kd_dist installs its own SIGTERM/SIGUSR1 handler when training starts (a Python handler
#    replaces an inherited "ignore"); anything else in the tree (data loader workers, compile
#    workers) simply ignores the signal instead of dying from it. (torch's elastic agent
#    re-installs its own SIGTERM handler: on SIGTERM it passes SIGTERM on to the training
#    processes and kills them 30 s later.)
#
# 2. SIGUSR1 or SIGTERM received by this script is relayed as SIGUSR1 to the launcher's child
#    processes, i.e. the training processes. This is what reaches them whichever proctrack
#    plugin the cluster uses: with proctrack/pgid only the task's process group is signalled,
#    and torch's elastic agent starts every training process in a session of its own, out of
#    that group. (With proctrack/cgroup a training process may get the signal twice; kd_dist only
#    remembers that it came, so that is harmless.)
#
# 3. The exit status 75 ("preempted, checkpoint saved, run me again") is restored. Both
#    `accelerate launch` and `torchrun` exit with 1 when any training process exits non-zero,
#    whatever its status was. launch/kd_dist_rank.py (what the training processes run) writes
#    its exit status into $KD_DIST_EXIT_DIR; when the launcher fails and a training process
#    recorded 75 and none recorded another failure, this script exits with 75.
set -uo pipefail # no -e: every exit status below is looked at explicitly

if [[ $# -eq 0 ]]; then
    echo "usage: $0 LAUNCHER [ARGS...]   (run by launch/slurm_*.sbatch through srun)" >&2
    exit 2
fi

node=$(hostname 2>/dev/null || echo "node ${SLURM_NODEID:-?}")

# Node-local folder for the exit statuses of this node's training processes (every node's
# training processes stop for a preemption together, so this node's own statuses suffice).
KD_DIST_EXIT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/kd_dist_exit.XXXXXX") || exit 1
export KD_DIST_EXIT_DIR
trap 'rm -rf "$KD_DIST_EXIT_DIR"' EXIT

# (1) The launcher, with SIGUSR1 and SIGTERM ignored. `trap ''` in the subshell sets the
# signals to "ignore", and `exec` keeps that for the launcher that replaces the subshell.
(
    trap '' USR1 TERM
    exec "$@"
) &
launcher_pid=$!

# (2) Relay: SIGUSR1 to each direct child of the launcher (the training processes; any other
# child started with the launcher's "ignore" and is unaffected).
signalled=0
# shellcheck disable=SC2329 # invoked by the traps below
relay() {
    signalled=1
    local children
    children=$(pgrep -P "$launcher_pid" 2>/dev/null) || true
    echo "kd_dist node_task on $node: got SIG$1; asking the training processes" \
        "(${children//$'\n'/ }) to checkpoint and stop (SIGUSR1)" >&2
    local pid
    for pid in $children; do
        kill -USR1 "$pid" 2>/dev/null || true
    done
}
trap 'relay USR1' USR1
trap 'relay TERM' TERM

# `wait` returns early (status > 128) when a trapped signal arrives; wait again until the
# launcher has really exited. bash keeps a finished child's status for the next `wait`.
while :; do
    signalled=0
    status=0
    wait "$launcher_pid" || status=$?
    ((signalled)) || break
done

# (3) Give the launcher's generic failure back its meaning.
if ((status != 0 && status != 75)); then
    preempted=0
    other_failure=0
    for record in "$KD_DIST_EXIT_DIR"/*; do
        [[ -f $record ]] || continue
        read -r code <"$record" || continue
        if [[ $code == 75 ]]; then
            preempted=1
        elif [[ $code != 0 ]]; then
            other_failure=1
        fi
    done
    if ((preempted && !other_failure)); then
        echo "kd_dist node_task on $node: the launcher exited with $status because the" \
            "training processes stopped for preemption (status 75); reporting 75" >&2
        status=75
    fi
fi
exit "$status"
