"""The bench's cases on tiny inputs: they run, and the two sides do the same work (the
figures themselves are bench/'s business, never asserted here)."""

import os
import shutil
import sys

import pytest

from bench import daemon, ddp, gpu, instructions, loop, stats, sweep, switches


def test_the_loop_and_its_baselines_do_the_same_work():
    text = loop.MLP.format(samples=512, epochs=2, checkpoint=loop.DEFAULT_CADENCE)
    _, ours = loop.run_traind(text)
    assert 0 <= loop.STALLS[-1] < 1
    for gather in (True, False):
        _, theirs = loop.run_hand(text, gather=gather)
        assert theirs == ours
    big = loop.BIG.format(samples=400).replace("1024, 4096", "1024, 64").replace("4096, 1024", "64, 1024")
    assert loop.run_traind(big)[1] == loop.run_hand(big, True, every_steps=20)[1]


def test_a_sample_taken_in_a_process_of_its_own_is_that_runs_figures():
    """bench's samples run in fresh interpreters: the steps come back, and a traind run's
    time in saves reaches STALLS here."""
    text, warmup = (loop.MLP.format(samples=n, epochs=1, checkpoint=loop.DEFAULT_CADENCE) for n in (512, 256))
    stalls = len(loop.STALLS)
    seconds, steps = loop.in_a_process("run_traind", text, warmup)
    assert seconds > 0 and steps == loop.run_hand_gather(text)[1] > 0
    assert len(loop.STALLS) == stalls + 1 and 0 <= loop.STALLS[-1] < 1  # that run's, not its warm-up's
    assert loop.in_a_process("run_hand", text, warmup, module="bench.switches")[1] == steps


def test_each_switch_and_its_hand_loop_do_the_same_work():
    for switch in switches.SWITCHES.values():
        text = switches.job_text(512, 1, switch)
        assert loop.run_traind(text)[1] == switches.run_hand(text)[1] > 0


def test_the_gpu_rows_plumbing_on_a_cpu():
    """bench/gpu.py's runs, on the CPU at a tiny size: each side does the same work, a look
    every step changes nothing of it, the stall and the copy are measured."""
    for text in (gpu.seed_mlp(256, 1, "cpu"), gpu.mid_mlp(512, 1, "cpu").replace("2048", "64")):
        steps = loop.run_traind(text)[1]
        assert gpu.run_traind_every_loss(text)[1] == switches.run_hand(text, read_each_loss=False)[1] == steps > 0
    stall, copy = gpu.save_stall(3200, "cpu", width=64)
    assert stall > 0 and copy > 0


def test_ls_and_saves_are_measured_through_the_real_cli(tmp_path):
    cold, warm = daemon._ls(tmp_path, 30)
    assert cold > 0 and warm > 0
    assert daemon._saves(tmp_path, 12) > 0


def test_two_jobs_at_once_are_measured_through_a_real_daemon(tmp_path):
    assert daemon._two_jobs(tmp_path, 2, 1) > 0


def test_the_two_process_job_and_the_hand_torchrun_script_do_the_same_work():
    text = ddp.job_text(512, 2)
    seconds, ours = ddp.run_traind(text)
    assert seconds > 0 and ours == ddp.run_hand(text)[1] > 0


def test_a_sweeps_cost_per_trial_is_measured_through_a_real_daemon():
    rows = sweep.measure(quick=True)
    assert [r["case"] for r in rows] == ["sweep: trial made -> first step, p50 (s)",
                                         "sweep: a trial's end -> the next one's first step, p50 (s)",
                                         "sweep: the daemon's CPU time per trial (s)", "sweep: pruner call (ms)"]
    assert all(r["traind"] > 0 and r["baseline"] > 0 for r in rows)
    assert "its 2 helpers" in rows[2]["detail"]  # the validator's and the template's CPU counted


def test_starts_and_resumes_are_measured_through_a_real_daemon_warm_and_cold(tmp_path):
    """Each start is timed to a real first step (after the resume, for a resume): the
    warm daemon's, the cold one's, traind run's."""
    for mode in ("--warm", "--cold"):
        assert all(s > 0 for s in daemon._latency(tmp_path, 1, mode))
    assert all(s > 0 for s in daemon._run_latency(tmp_path, 1))
    resumed, run = daemon._resume(tmp_path, 1)
    assert len(resumed) == len(run) == 1 and all(s > 0 for s in resumed + run)


def test_the_save_cost_row_times_real_saves_on_both_sides(monkeypatch):
    from traind.jobs.checkpoint import Checkpointer

    made = {"traind": [], "hand": []}
    save, by_hand = Checkpointer.save, loop._save_by_hand
    monkeypatch.setattr(Checkpointer, "save", lambda self, *a, **k: made["traind"].append(save(self, *a, **k)))
    monkeypatch.setattr(loop, "_save_by_hand",
                        lambda path, *a: (by_hand(path, *a), made["hand"].append(path.stat().st_size)))
    ours, theirs = loop.save_cost(1, steps=40, every=20)
    assert len(made["traind"]) == len(made["hand"]) == 2 + 2  # the warm-up's and the round's
    assert all(made["traind"]) and all(size > 0 for size in made["hand"])  # committed saves, written files
    assert isinstance(ours, float) and isinstance(theirs, float)


def test_the_step_cost_row_times_every_side_over_the_same_steps():
    for precision in ("fp32", "bf16"):
        cost = loop.step_cost(1, samples=512, precision=precision)
        assert set(cost) == {"hand", "traind-step", "traind-step+boundary", "hand-again"}
        assert all(0 < us < 1e6 for us in cost.values())


def test_the_paired_row_compares_neighbouring_runs_of_the_same_work(monkeypatch):
    runs = []
    for name in ("run_traind", "run_hand_gather"):
        real = getattr(loop, name)
        monkeypatch.setattr(loop, name, lambda text, real=real, name=name: (runs.append(name), real(text))[1])
    found = loop.paired(loop.MLP.format(samples=512, epochs=1, checkpoint=loop.DEFAULT_CADENCE), 3)
    assert runs.count("run_traind") == 1 + 3 and runs.count("run_hand_gather") == 2 + 6  # warm-ups, then rounds
    assert set(found) == {"traind", "hand-again"} and all(len(r) == 3 for r in found.values())
    assert all(0 < r < 10 for ratios in found.values() for r in ratios)


def test_the_interval_holds_the_median_and_narrows_with_more_values():
    wide = stats.interval([0.9, 1.1, 0.95, 1.05, 1.0])
    narrow = stats.interval([0.9, 1.1, 0.95, 1.05, 1.0] * 20)
    assert wide[0] <= 1.0 <= wide[1] and narrow[0] <= 1.0 <= narrow[1]
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    assert stats.interval([1.0] * 7) == (1.0, 1.0)
    row = stats.paired_row("case", [0.99] * 9, [1.0] * 9, 0.97, "detail")
    assert row["verdict"] == "met" and stats.paired_row("c", [0.9] * 9, [1.0] * 9, 0.97, "d")["verdict"] == "missed"


def test_each_side_of_the_instruction_count_trains_the_same_steps(monkeypatch):
    from traind.jobs import train

    monkeypatch.setattr(train, "LOOK_SECONDS", train.LOOK_SECONDS)  # the count's process turns the clock's looks off
    assert [instructions._child(side, "fp32", 1) for side in ("hand", "traind")] == [103, 103]
    assert train.LOOK_SECONDS == float("inf")


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind (apt-get install valgrind; .ci/run does)")
def test_callgrind_counts_the_instructions_of_more_work_as_more():
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    idle, _ = instructions.instructions([sys.executable, "-S", "-c", "pass"], env)
    busy, out = instructions.instructions([sys.executable, "-S", "-c", "print(sum(range(3_000_000)))"], env)
    assert out.strip() == str(sum(range(3_000_000)))
    assert busy - idle > 10 * 3_000_000  # tens of instructions an element, counted
