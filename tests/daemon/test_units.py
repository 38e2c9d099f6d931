import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import REPO
from traind.daemon.cli import cli
from traind.daemon.units import unit


@pytest.mark.parametrize("user, name", [(False, "traind.service"), (True, "traind-user.service")])
def test_the_shipped_units_are_the_generated_ones(user, name):
    assert (REPO / "systemd" / name).read_text() == unit(user=user)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize("user", [False, True])
def test_units_pass_systemd_analyze_verify_without_a_warning(tmp_path, user):
    path = tmp_path / ("traind-user.service" if user else "traind.service")
    path.write_text(CliRunner().invoke(cli, ["systemd-unit", *(["--user"] if user else [])]).output)
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout + result.stderr == ""


def test_the_printed_unit_starts_this_installation():
    out = CliRunner().invoke(cli, ["systemd-unit"]).output
    assert f"ExecStart={Path(sys.executable).parent / 'traind'} --home /var/lib/traind daemon" in out
    for key in ("Type=notify", "NotifyAccess=main", "WatchdogSec=", "Restart=on-failure", "RestartPreventExitStatus=2",
                "KillMode=mixed", "KillSignal=SIGTERM", "TimeoutStopSec=", "OOMPolicy=continue", "StateDirectory=traind",
                "User=traind"):
        assert key in out
    assert not any("#" in line.split("=", 1)[-1] for line in out.splitlines() if "=" in line)  # no trailing comments
    user = CliRunner().invoke(cli, ["systemd-unit", "--user"]).output
    assert "ExecStart=" in user and "User=" not in user and "WantedBy=default.target" in user


@pytest.mark.parametrize("user", [False, True])
@pytest.mark.parametrize("where", ["group", "command", "env"])
def test_a_unit_for_another_home_serves_that_home(tmp_path, user, where, monkeypatch):
    home = tmp_path / "lab home"
    args = ["systemd-unit", *(["--user"] if user else [])]
    if where == "group":
        args = ["--home", str(home), *args]
    elif where == "command":
        args = [*args, "--home", str(home)]
    else:
        monkeypatch.setenv("TRAIND_HOME", str(home))
    out = CliRunner().invoke(cli, args).output
    assert f'--home "{home}" daemon' in out  # quoted: the path has a space
    if not user:
        assert f'ReadWritePaths="{home}"' in out and "StateDirectory" not in out and "/var/lib/traind" not in out
    if shutil.which("systemd-analyze"):
        path = tmp_path / "traind.service"
        path.write_text(out)
        result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stdout + result.stderr == ""
