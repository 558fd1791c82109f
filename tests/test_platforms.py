"""The install on Linux, macOS and Windows: requirements.txt's environment markers, and the suite without triton.

triton publishes Linux wheels only, so requirements.txt installs it on Linux only; elsewhere (and on a Linux machine
without it) the Triton interpreter tests must skip, and every other test pass.
"""
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
#: the markers' view of each platform (the keys a marker may test; the others are this machine's)
PLATFORMS = {
    "linux": dict(sys_platform="linux", platform_system="Linux", os_name="posix", platform_machine="x86_64"),
    "macos": dict(sys_platform="darwin", platform_system="Darwin", os_name="posix", platform_machine="arm64"),
    "windows": dict(sys_platform="win32", platform_system="Windows", os_name="nt", platform_machine="AMD64"),
}
#: packages without macOS or Windows wheels
LINUX_ONLY = {"triton"}
#: test files that use triton: run without it, their triton tests skip and the others pass
TRITON_TEST_FILES = ["tests/chunked_loss/test_triton_interpret.py", "tests/benchmarks/test_bench_simpo.py"]


def requirements():
    """requirements.txt's lines as pip reads them: a ``#`` at the start or after a space starts a comment."""
    lines = (re.sub(r"(^|\s)#.*$", "", line).strip() for line in (REPO / "requirements.txt").read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def test_linux_only_packages_are_installed_on_linux_only():
    listed = {canonicalize_name(requirement.name) for requirement in requirements()}
    assert LINUX_ONLY <= listed and "deepspeed" not in listed  # DeepSpeed is optional, built by CI (.ci/run)
    for platform, environment in PLATFORMS.items():
        installed = {canonicalize_name(requirement.name) for requirement in requirements()
                     if requirement.marker is None or requirement.marker.evaluate(environment)}
        assert installed == (listed if platform == "linux" else listed - LINUX_ONLY), platform


@pytest.mark.subprocess
def test_without_triton_its_tests_skip_and_the_others_pass(tmp_path):
    """A fresh interpreter where ``import triton`` fails runs the test files that use triton."""
    report = tmp_path / "report.xml"
    without_triton = "import sys; sys.modules['triton'] = None; import pytest; sys.exit(pytest.main(sys.argv[1:]))"
    completed = subprocess.run(
        [sys.executable, "-c", without_triton, "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
         *TRITON_TEST_FILES],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:]
    cases = list(ElementTree.parse(report).iter("testcase"))
    skipped = {case.get("classname").rsplit(".", 1)[-1] + "::" + case.get("name") for case in cases
               if case.find("skipped") is not None}
    interpreter_tests = [case for case in cases if case.get("classname").endswith("test_triton_interpret")]
    assert interpreter_tests and all(case.find("skipped") is not None for case in interpreter_tests)
    assert "test_bench_simpo::test_our_triton_kernel_names_are_found" in skipped
    ran = [case for case in cases if case.find("skipped") is None]
    assert ran, "no test ran without triton"
