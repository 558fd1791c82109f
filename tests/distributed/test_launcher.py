"""``run_torchrun``: a run past its timeout fails the test and takes its workers down with the launcher."""
import time
from pathlib import Path

import pytest

from tests.distributed.launcher import run_torchrun

#: each worker leaves its pid, then hangs (as a deadlocked collective would)
HANGING_WORKER = "import os, pathlib, sys, time\npathlib.Path(sys.argv[1], f'{os.getpid()}.pid').touch()\ntime.sleep(600)\n"


def _is_running(pid: int) -> bool:
    """True while the process exists and is not a zombie (an orphan waits for init to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_run_past_its_timeout_leaves_no_worker_behind(tmp_path):
    worker = tmp_path / "hanging_worker.py"
    worker.write_text(HANGING_WORKER)
    with pytest.raises(pytest.fail.Exception, match="torchrun timed out after 5 s"):
        run_torchrun([str(worker), str(tmp_path)], timeout=5)
    worker_pids = [int(path.stem) for path in tmp_path.glob("*.pid")]
    assert len(worker_pids) == 2, "the workers did not start within the timeout: nothing was checked"
    deadline = time.monotonic() + 5
    while any(map(_is_running, worker_pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_is_running, worker_pids)), "workers outlived the killed launcher"
