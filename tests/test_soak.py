"""The kill soak of bench/soak.py, at CI size: 16 SIGKILLs of a live daemon, its workers
and the ranks of a two-process job, biased toward saves and intake, with saves rotating
out at nearly every commit; every job must end exactly, and `traind verify` find every
save whole (see its doc)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.timeout(900)
def test_sixteen_kills_and_every_job_ends_exactly(tmp_path):
    out = tmp_path / "soak.json"
    result = subprocess.run([sys.executable, "-m", "bench.soak", "--kills", "16", "--seed", "1", "--json", str(out)],
                            capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text())
    assert result.returncode == 0 and report["failures"] == [], report["failures"] or result.stderr[-3000:]
    assert report["kills"] == 16
    assert report["by_target"]["daemon"] > 0 and report["by_target"]["worker"] > 0
    assert report["kills_during_a_save"] > 0  # the save path was hit, not only quiet moments
    assert report["resumes"] >= 3  # and the jobs killed went on from their saves
    assert report["jobs"] >= 3 and report["jobs_by_template"]["ddp"] >= 1  # two-process jobs among them
    assert report["saves_rotated_out"] > 100  # retention removed saves all along, kills among them
