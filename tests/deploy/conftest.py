"""Fixtures of the deployment tests: the C++ consumer (export/), built once per module or taken from
SDCA_CONSUMER (what `make cpp-test` built)."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _unavailable(reason: str):
    if os.environ.get("SDCA_REQUIRE_CONSUMER") == "1":
        pytest.fail(f"{reason} (SDCA_REQUIRE_CONSUMER=1; apt-get install cmake libopencv-dev)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def consumer(tmp_path_factory):
    prebuilt = os.environ.get("SDCA_CONSUMER")
    if prebuilt and os.path.isfile(prebuilt):
        return prebuilt
    if shutil.which("cmake") is None:
        _unavailable("cmake is not installed")
    build = tmp_path_factory.mktemp("consumer")
    configure = subprocess.run(["cmake", "-S", os.path.join(ROOT, "export"), "-B", str(build)], capture_output=True,
                               text=True)
    if configure.returncode != 0:
        _unavailable(f"export/ did not configure: {configure.stderr[-500:]}")
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True)
    return str(build / "sdca_segment")
