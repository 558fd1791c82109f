"""``run_torchrun``: a run past its timeout fails the test and takes its workers down with the launcher."""
import time
from pathlib import Path

import pytest

from tests.distributed.launcher import run_torchrun

#: each worker leaves its pid, then hangs (as a deadlocked collective would)
HANGING_WORKER = "import os, pathlib, sys, time\npathlib.Path(sys.argv[1], f'{os.getpid()}.pid').touch()\ntime.sleep(600)\n"
#: the run's timeouts, tried in turn until both workers had started when it expired: how long torchrun takes to
#: start them depends on the machine (importing torch, its host name, the load), and the test is about workers
#: that are running when the launcher is killed
TIMEOUTS = (5, 30)


def _is_running(pid: int) -> bool:
    """True while the process exists and is not a zombie (an orphan waits for init to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_until_gone(pids, seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while any(map(_is_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
@pytest.mark.subprocess
def test_a_run_past_its_timeout_leaves_no_worker_behind(tmp_path):
    worker = tmp_path / "hanging_worker.py"
    worker.write_text(HANGING_WORKER)
    for timeout in TIMEOUTS:
        pid_folder = tmp_path / f"timeout_{timeout}"
        pid_folder.mkdir()
        with pytest.raises(pytest.fail.Exception, match=f"torchrun timed out after {timeout} s"):
            run_torchrun([str(worker), str(pid_folder)], timeout=timeout)
        worker_pids = [int(path.stem) for path in pid_folder.glob("*.pid")]
        _wait_until_gone(worker_pids)
        assert not any(map(_is_running, worker_pids)), "workers outlived the killed launcher"
        if len(worker_pids) == 2:
            return
    pytest.fail(f"the workers did not start within {TIMEOUTS[-1]} s: nothing was checked")
