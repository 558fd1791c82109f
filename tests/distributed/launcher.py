"""Run a script under ``torchrun --standalone`` on CPU for a test, and leave no process behind.

``--standalone`` lets the launcher's own rendezvous store bind a free port and keep it (no probe-then-close
race on a port picked in advance). When the run outlives its timeout or the test is interrupted, the launcher
and everything below it are killed: killing the launcher alone would leave its workers running on the CI's
two cores. torchrun starts every worker in a session of its own, so the launcher's process group does not
hold them: each process of the tree is killed with its process group. Output goes to files, not pipes, so
that nothing left holding them can keep the test waiting.

Every run is a CPU run on gloo, whatever GPUs the machine has (:data:`CPU_ONLY_ENVIRONMENT`).
"""
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence

import psutil
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

#: What makes every run of these helpers a CPU run on gloo, also on a machine with GPUs (with one GPU, two
#: processes that each pick ``cuda:0`` fail with NCCL's "Duplicate GPU detected"):
#: no CUDA device is visible (so no process, torchrun's own included, initialises CUDA or picks a GPU, and
#: ``python -m patches train`` sets ``use_cpu``); the HF Trainer takes its CPU path, gloo among several
#: processes, whatever ``use_cpu`` says (accelerate 1.15 runs each rank as a lone process when ``use_cpu`` is off
#: and no GPU is visible); DeepSpeed uses its CPU accelerator. ``accelerate launch`` sets ``ACCELERATE_USE_CPU``
#: from its own config: there the hidden GPUs are what keep the run on the CPU.
CPU_ONLY_ENVIRONMENT = {"CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true", "DS_ACCELERATOR": "cpu"}


def end_worker() -> None:
    """The last call of a worker script under torchrun, once its results are written: every rank past a barrier,
    the process group closed (``patches.distributed.end_distributed_run``), then out without the interpreter's
    teardown. Under CPU load gloo's threads sometimes abort that teardown ("terminate called without an active
    exception", about one run in six on 2 busy cores), failing a run whose results are complete."""
    from patches.distributed import end_distributed_run

    end_distributed_run()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:  # the whole group has already exited
        pass


def _kill_process_tree(launcher: subprocess.Popen) -> None:
    """SIGKILL the still-running (so not reaped: its pid is still its own) launcher, every process below
    it and their process groups (which also hold what they started since the snapshot)."""
    try:
        descendants = psutil.Process(launcher.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    groups = {launcher.pid}  # start_new_session: the launcher leads its group
    for process in descendants:
        try:
            groups.add(os.getpgid(process.pid))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgrp())  # never the test's own group
    for group in groups:
        _kill_group(group)
    for process in descendants:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    launcher.wait()


def run_torchrun(script_arguments: Sequence[str], timeout: float, nproc: int = 2,
                 environment: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=<nproc> <script_arguments>`` (one thread per worker, the repo
    importable); fails the test with the run's output tails if it exits non-zero or outlives ``timeout`` s."""
    return run_launcher(["torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"], script_arguments,
                        timeout, environment, label="torchrun")


def run_launcher(launcher_module: Sequence[str], script_arguments: Sequence[str], timeout: float,
                 environment: Optional[Dict[str, str]] = None, label: Optional[str] = None
                 ) -> subprocess.CompletedProcess:
    """``python -m <launcher_module...> <script_arguments>`` (torchrun, ``accelerate launch``; no launcher module:
    ``python <script_arguments>``), as :func:`run_torchrun` describes; ``environment`` adds to the test's, and
    :data:`CPU_ONLY_ENVIRONMENT` comes last."""
    command = [sys.executable, *(["-m", *launcher_module] if launcher_module else []), *script_arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                   **(environment or {}), **CPU_ONLY_ENVIRONMENT}
    with tempfile.TemporaryFile("w+") as stdout_file, tempfile.TemporaryFile("w+") as stderr_file:
        launcher = subprocess.Popen(command, stdout=stdout_file, stderr=stderr_file, text=True, env=environment,
                                    cwd=REPO_ROOT, start_new_session=True)
        timed_out = False
        try:
            launcher.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if launcher.poll() is None:  # timed out, or the test was interrupted (Ctrl-C, pytest-timeout)
                _kill_process_tree(launcher)
            else:
                _kill_group(launcher.pid)  # anything of its group it left behind
        stdout_file.seek(0)
        stderr_file.seek(0)
        stdout, stderr = stdout_file.read(), stderr_file.read()
    if timed_out or launcher.returncode != 0:
        what = f"timed out after {timeout} s" if timed_out else f"exited with status {launcher.returncode}"
        label = label or " ".join(launcher_module) or "python"
        pytest.fail(f"{label} {what}:\n{stdout[-3000:]}\n{stderr[-6000:]}", pytrace=False)
    return subprocess.CompletedProcess(command, launcher.returncode, stdout, stderr)
