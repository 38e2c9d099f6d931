"""Fixtures of the tests that start real daemons (helpers in live.py)."""

import pytest
from click.testing import CliRunner

from tests.daemon.live import JOB, Daemons, final_weights, locked, wait_for
from traind.daemon.cli import cli
from traind.daemon.home import Home


@pytest.fixture
def home(tmp_path):
    """A home with its inbox/, for tests that drive intake and the CLI directly."""
    h = Home(tmp_path / "home")
    h.inbox.mkdir(parents=True)
    return h


@pytest.fixture
def daemons(tmp_path):
    d = Daemons(tmp_path / "home")
    yield d
    d.close()
    wait_for(lambda: not any(p.name for p in (tmp_path / "home" / "jobs").glob("*/lock")
                             if locked(p)), "workers to exit", 60)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same job trained by `traind run`, never interrupted."""
    tmp = tmp_path_factory.mktemp("reference")
    (tmp / "soak.yaml").write_text(JOB)
    result = CliRunner().invoke(cli, ["run", str(tmp / "soak.yaml"), "--dir", str(tmp / "run")])
    assert result.exit_code == 0, result.output
    return final_weights(tmp / "run")
