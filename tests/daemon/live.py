"""Helpers for tests that start real daemons: the CLI in-process, polling with deadlines
(never bare sleeps), and daemons that are stopped whatever the test did."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from tests.conftest import EXAMPLES
from traind.daemon.cli import cli
from traind.store.saves import list_saves

JOB = (EXAMPLES / "tied.yaml").read_text().replace("samples: 1024", "samples: 6144").replace(
    "epochs: 5", "epochs: 8").replace("name: tied", "name: soak")


def traind(home, *args):
    return CliRunner().invoke(cli, ["--home", str(home), *map(str, args)])


def rows(home):
    result = traind(home, "ls", "--json")
    assert result.exit_code == 0, result.output
    return {r["name"]: r for r in json.loads(result.output)}


def wait_for(predicate, what, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Daemons:
    """Starts daemons on one home; kills whatever is left at the end."""

    def __init__(self, home):
        self.home, self.procs = home, []
        self.log = home.parent / "daemons.err"  # every daemon's stderr, in order (a pipe nobody reads could fill)

    def start(self, *options):
        with open(self.log, "a") as err:
            proc = subprocess.Popen([sys.executable, "-m", "traind.daemon.cli", "--home", str(self.home), "daemon",
                                     *options], stdout=subprocess.DEVNULL, stderr=err, text=True)
        self.procs.append(proc)
        return proc

    def events(self):
        return self.log.read_text() if self.log.exists() else ""

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def locked(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def final_weights(folder):
    saves = list_saves(folder / "saves")[0]
    assert "final" in saves[-1].kinds
    return load_file(saves[-1].path / "model.safetensors")


def assert_equal(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def submit(home, tmp_path, text=JOB, name="soak.yaml"):
    path = tmp_path / name
    path.write_text(text)
    result = traind(home, "submit", path)
    assert result.exit_code == 0, result.output
