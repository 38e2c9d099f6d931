"""Writers that do not rename, into a live daemon's inbox/: a file appended in pieces, or
written with pauses while held open, becomes one job, with every piece, and nothing is
rejected or lost."""

import json
import subprocess

import pytest

from tests.daemon.live import rows, wait_for

PIECES = [
    'name = "{name}"\nseed = 3\n',
    '[model]\nlayers = [["Linear", 20, 10]]\n',
    '[data]\nsamples = 200\n',
    '[train]\nepochs = 2\n',
]


@pytest.mark.parametrize("how", ["appended", "held-open"])
def test_a_file_written_in_pieces_becomes_one_whole_job(daemons, how):
    daemons.start()
    inbox = daemons.home / "inbox"
    wait_for(lambda: inbox.is_dir(), "the daemon to make its inbox")
    name = f"pieces-{how}"
    pieces = [p.format(name=name) for p in PIECES]
    if how == "appended":  # `>>` opens and closes the file for each piece
        script = "".join(f"printf '%s' '{p}' >> {inbox}/{name}.toml; sleep 0.5; " for p in pieces)
    else:  # one writer that pauses with the file open
        script = (f"exec 3>>{inbox}/{name}.toml; "
                  + "".join(f"printf '%s' '{p}' >&3; sleep 2.5; " for p in pieces) + "exec 3>&-")
    subprocess.run(["bash", "-c", script], check=True, timeout=60)
    wait_for(lambda: rows(daemons.home).get(name, {}).get("state") == "done", "the job to finish", 180)
    spec = json.loads((daemons.home / "jobs" / name / "spec.json").read_text())
    assert (spec["seed"], spec["data"]["samples"], spec["train"]["epochs"]) == (3, 200, 2)  # every piece
    assert list((daemons.home / "rejected").iterdir()) == []
    assert list(rows(daemons.home)) == [name]
