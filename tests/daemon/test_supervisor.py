"""Real daemons, real workers, real signals (polling with deadlines, never bare sleeps):
a job's life under the daemon, its control, and its stops."""

import json
import os
import signal
import subprocess
import sys
import time

from tests.daemon.live import JOB, assert_equal, final_weights, locked, rows, submit, traind, wait_for
from traind.store.saves import list_saves


def test_a_submitted_job_trains_to_the_same_weights_as_traind_run(daemons, tmp_path, reference):
    daemons.start()
    submit(daemons.home, tmp_path)
    wait_for(lambda: rows(daemons.home).get("soak", {}).get("state") == "done", "the job to finish")
    assert_equal(final_weights(daemons.home / "jobs" / "soak"), reference)
    row = rows(daemons.home)["soak"]
    assert row["step"] == row["total_steps"] and row["restarts"] == 0 and row["device"] == "cpu"


def test_the_daemon_sigkilled_mid_run_again_and_again_loses_nothing(daemons, tmp_path, reference):
    submit(daemons.home, tmp_path)
    folder = daemons.home / "jobs" / "soak"
    for kill in range(2):
        proc = daemons.start()
        before = rows(daemons.home).get("soak", {}).get("step", 0)
        wait_for(lambda: rows(daemons.home).get("soak", {}).get("step", 0) > before + 40, f"progress ({kill})")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        wait_for(lambda: not locked(folder / "lock"), "the orphaned worker to save and exit", 60)
    daemons.start()
    wait_for(lambda: rows(daemons.home)["soak"]["state"] == "done", "the job to finish")
    assert_equal(final_weights(folder), reference)
    assert (folder / "log").read_text().count("resumed from save") == 2


def test_a_worker_sigkilled_is_restarted_and_finishes_the_same(daemons, tmp_path, reference):
    daemons.start()
    submit(daemons.home, tmp_path)
    folder = daemons.home / "jobs" / "soak"
    wait_for(lambda: rows(daemons.home).get("soak", {}).get("step", 0) > 40, "progress")
    pid = int((folder / "lock").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: rows(daemons.home)["soak"]["state"] == "done", "the job to finish")
    assert_equal(final_weights(folder), reference)
    assert rows(daemons.home)["soak"]["restarts"] == 1
    status = json.loads(traind(daemons.home, "status", "soak", "--json").output)
    assert status["last_error"] is None and status["cause"] is None  # done: an old error no longer applies
    events = daemons.events()
    assert "soak: accepted from inbox/soak.json" in events and "soak: started on cpu0" in events
    assert "soak: the worker was killed by SIGKILL" in events and "restarting in 1 s" in events
    assert "soak: finished" in events


def test_pause_save_resume_and_cancel(daemons, tmp_path, reference):
    daemons.start()
    submit(daemons.home, tmp_path)
    folder = daemons.home / "jobs" / "soak"
    wait_for(lambda: rows(daemons.home).get("soak", {}).get("state") == "running", "the job to start")
    assert "save requested" in traind(daemons.home, "save", "soak", "--note", "before lunch").output
    wait_for(lambda: any("manual" in s.kinds for s in list_saves(folder / "saves")[0]), "the quicksave")
    manual = next(s for s in list_saves(folder / "saves")[0] if "manual" in s.kinds)
    assert manual.note == "before lunch"
    traind(daemons.home, "pause", "soak")
    wait_for(lambda: rows(daemons.home)["soak"]["state"] == "paused", "the pause")
    paused_at = list_saves(folder / "saves")[0][-1].step
    assert traind(daemons.home, "save", "soak").exit_code == 1  # not running
    traind(daemons.home, "resume", "soak")
    wait_for(lambda: rows(daemons.home)["soak"]["state"] == "done", "the job to finish")
    assert f"at step {paused_at}" in (folder / "log").read_text()
    assert_equal(final_weights(folder), reference)  # a manual save and a pause change nothing
    assert [s.note for s in list_saves(folder / "saves")[0] if "manual" in s.kinds] == ["before lunch"]  # once
    assert traind(daemons.home, "resume", "soak").exit_code == 1  # done: nothing to resume
    submit(daemons.home, tmp_path, JOB.replace("name: soak", "name: other"), "other.yaml")
    wait_for(lambda: rows(daemons.home).get("other", {}).get("state") == "running", "the second job to start")
    traind(daemons.home, "cancel", "other")
    wait_for(lambda: rows(daemons.home)["other"]["state"] == "cancelled", "the cancel")


def test_sigterm_stops_with_jobs_queued_and_they_resume_at_the_next_start(daemons, tmp_path, reference):
    proc = daemons.start()
    submit(daemons.home, tmp_path)
    wait_for(lambda: rows(daemons.home).get("soak", {}).get("step", 0) > 40, "progress")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert rows(daemons.home)["soak"]["state"] == "queued"
    daemons.start()
    wait_for(lambda: rows(daemons.home)["soak"]["state"] == "done", "the job to finish")
    assert_equal(final_weights(daemons.home / "jobs" / "soak"), reference)


def test_a_bad_file_is_rejected_while_the_daemon_serves_on(daemons, tmp_path):
    proc = daemons.start()
    inbox = daemons.home / "inbox"
    wait_for(lambda: inbox.is_dir(), "the inbox")
    # delivered whole, by a rename: rejected at once (a file written in place that does not
    # parse may still be growing, and waits 15 s: test_inbox_writers)
    (inbox / ".broken.toml.tmp").write_text("[model\n")
    os.rename(inbox / ".broken.toml.tmp", inbox / "broken.toml")
    wait_for(lambda: (daemons.home / "rejected" / "broken.toml.error").exists(), "the rejection")
    assert "not valid TOML" in (daemons.home / "rejected" / "broken.toml.error").read_text()
    (inbox / "fine.toml").write_text('[model]\nlayers = [["Linear", 20, 10]]\n[data]\nsamples = 100\n'
                                     '[train]\nepochs = 1\n')
    wait_for(lambda: rows(daemons.home).get("fine", {}).get("state") == "done", "the good job")
    assert proc.poll() is None


def test_one_daemon_per_home(daemons):
    first = daemons.start()
    wait_for(lambda: (daemons.home / "daemon.lock").exists(), "the first daemon")
    second = daemons.start()
    assert second.wait(60) == 1
    assert "another traind daemon serves" in daemons.events()
    assert first.poll() is None


def test_sd_notify_says_ready_watchdog_and_stopping(tmp_path):
    import socket

    address = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(60)
    env = dict(os.environ, NOTIFY_SOCKET=address, WATCHDOG_USEC="400000")
    proc = subprocess.Popen([sys.executable, "-m", "traind.daemon.cli", "--home", str(tmp_path / "home"), "daemon"],
                            env=env, stderr=subprocess.DEVNULL)
    try:
        seen = []

        def until(word):
            while not any(word in m for m in seen):
                seen.append(sock.recv(4096).decode())
            return True

        assert until("READY=1") and until("STATUS=0 running, 0 queued") and until("WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        assert until("STOPPING=1")
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        sock.close()


def test_load_game_queues_a_finished_job_again_and_it_replays_to_the_same_end(daemons, tmp_path, reference):
    daemons.start()
    submit(daemons.home, tmp_path)
    folder = daemons.home / "jobs" / "soak"
    wait_for(lambda: rows(daemons.home).get("soak", {}).get("state") == "done", "the job to finish")
    early = list_saves(folder / "saves")[0][0]
    result = traind(daemons.home, "load", "soak", early.id)
    assert result.exit_code == 0 and "queued again" in result.output
    wait_for(lambda: f"resumed from save {early.id}" in (folder / "log").read_text()
             and rows(daemons.home)["soak"]["state"] == "done", "the replay to finish")
    assert_equal(final_weights(folder), reference)
    assert early.id in {s.id for s in list_saves(folder / "saves")[0]}


def test_a_slow_hand_copy_into_a_live_daemon_is_taken_once_complete(daemons):
    daemons.start()
    inbox = daemons.home / "inbox"
    wait_for(inbox.is_dir, "the inbox")
    text = '[model]\nlayers = [["Linear", 20, 10]]\n[data]\nsamples = 100\n[train]\nepochs = 1\n'
    with open(inbox / "slow.toml", "w") as f:  # a copy that pauses half-way, as cp over a slow disk does
        f.write(text[:25])
        f.flush()
        time.sleep(0.4)
        f.write(text[25:])
    wait_for(lambda: rows(daemons.home).get("slow", {}).get("state") == "done", "the job")
    assert list((daemons.home / "rejected").iterdir()) == []


def test_load_game_into_a_running_job(daemons, tmp_path, reference):
    daemons.start()
    submit(daemons.home, tmp_path)
    folder = daemons.home / "jobs" / "soak"
    wait_for(lambda: rows(daemons.home).get("soak", {}).get("state") == "running", "the job to start")
    traind(daemons.home, "save", "soak")  # a quicksave: rotation never takes it away before the load
    wait_for(lambda: any("manual" in s.kinds for s in list_saves(folder / "saves")[0]), "the quicksave")
    wait_for(lambda: len(list_saves(folder / "saves")[0]) >= 3, "saves after it")
    early = next(s for s in list_saves(folder / "saves")[0] if "manual" in s.kinds)
    result = traind(daemons.home, "load", "soak", early.id)
    assert result.exit_code == 0 and f"continues from save {early.id}" in result.output
    wait_for(lambda: f"resumed from save {early.id}" in (folder / "log").read_text(), "the reload")
    wait_for(lambda: rows(daemons.home)["soak"]["state"] == "done", "the job to finish")
    assert_equal(final_weights(folder), reference)
    watched = traind(daemons.home, "status", "soak", "--watch")
    assert watched.exit_code == 0 and "soak: done" in watched.output


def test_a_file_whose_code_kills_its_process_is_rejected_and_the_daemon_serves_on(daemons):
    proc = daemons.start()
    inbox = daemons.home / "inbox"
    wait_for(inbox.is_dir, "the inbox")
    (inbox / "poison.py").write_text("import os\ndef net():\n    os._exit(9)\n")
    (inbox / "poison.toml").write_text('python_path = ["."]\n[model]\ntarget = "poison:net"\n')
    wait_for(lambda: (daemons.home / "rejected" / "poison.toml.error").exists(), "the rejection")
    assert "ended the validating process" in (daemons.home / "rejected" / "poison.toml.error").read_text()
    assert proc.poll() is None


def test_ls_and_status_tell_a_dead_daemon_and_its_jobs_are_queued_not_running(daemons, tmp_path):
    proc = daemons.start()
    wait_for(lambda: (daemons.home / "daemon.lock").exists(), "the daemon")
    submit(daemons.home, tmp_path)
    wait_for(lambda: rows(daemons.home).get("soak", {}).get("state") == "running", "the job to start")
    assert f"daemon pid {proc.pid}, up 00m" in traind(daemons.home, "ls").output.splitlines()[0]
    status = wait_for(lambda: (s := json.loads(traind(daemons.home, "status", "soak", "--json").output))["eta_s"]
                      and s, "an ETA from the steps/s of this run")
    assert status["daemon"]["pid"] == proc.pid and status["state"] == "running" and status["steps_per_s"] > 0
    assert "ETA " in traind(daemons.home, "status", "soak").output.splitlines()[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    folder = daemons.home / "jobs" / "soak"
    wait_for(lambda: not locked(folder / "lock"), "the orphaned worker to save and exit", 60)
    assert json.loads((folder / "state.json").read_text())["state"] == "running"  # as the dead daemon left it
    assert rows(daemons.home)["soak"]["state"] == "queued"
    listing = traind(daemons.home, "ls").output
    assert listing.startswith("no daemon serves") and "running" not in listing
    status = json.loads(traind(daemons.home, "status", "soak", "--json").output)
    assert status["daemon"] is None and status["state"] == "queued" and "no process trains it" in status["last_error"]
    other = tmp_path / "other.yaml"
    other.write_text(JOB.replace("name: soak", "name: other"))
    result = traind(daemons.home, "submit", other)
    assert result.exit_code == 0 and "warning: no daemon serves" in result.output
