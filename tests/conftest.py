import os
import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import settings

from traind.jobs.jobfile import load_job

# The suite's fuzzing is a smoke test; HYPOTHESIS_PROFILE=long hunts further.
settings.register_profile("default", max_examples=300, deadline=None)
settings.register_profile("long", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail any test that leaves a thread running (as watchdog's suite does)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked:
            return
        time.sleep(0.05)
    pytest.fail(f"test leaked threads: {leaked}")


@pytest.fixture
def write_job(tmp_path):
    """write_job(text, suffix='.toml', name='job') -> the path of a job file in tmp_path."""

    def write(text: str, suffix: str = ".toml", name: str = "job") -> Path:
        path = tmp_path / f"{name}{suffix}"
        path.write_text(text)
        return path

    return write


@pytest.fixture
def spec_of(write_job):
    """spec_of(text) -> the JobSpec of a TOML job file."""
    return lambda text, suffix=".toml": load_job(write_job(text, suffix)).spec


TINY = '[model]\nlayers = [["Linear", 20, 10]]\n[data]\nsamples = 100\n'  # the smallest job that trains

MLP = """
seed = 0
[model]
layers = [["Linear", 20, 32], ["ReLU"], ["Dropout", {p = 0.2}], ["Linear", 32, 10]]
[data]
samples = 300
batch_size = 32
[train]
epochs = 3
"""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous the test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
