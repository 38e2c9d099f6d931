"""A job of several nodes (`distributed.nodes > 1`) in a Slurm batch job: the worker on the
batch job's first node holds the job folder and runs `srun`, which starts one launcher on
each node of the allocation:

    srun --ntasks-per-node=1 python -m traind.daemon.slurm_nodes --home HOME NAME
         --endpoint FIRST_NODE:PORT --run-id traind-JOBID-RESTART

Each launcher is torch's elastic agent (daemon/launch.py: what torchrun runs, with
torchrun's multi-node arguments: `--nnodes`, a c10d rendezvous at the endpoint, the same
run id on every node) and starts the node's `distributed.processes` ranks; the ranks
agree on their global ranks at the rendezvous, and the main rank, on whichever node,
writes the saves into the shared job folder and its ending into `ranks.outcome` there,
which the worker reads once srun is over.

The cluster's warning (preemption, the time limit) reaches the worker alone
(`--signal=B:`); the worker passes it to srun, which passes it to each launcher (srun
forwards USR2 and keeps waiting; a SIGTERM to srun would end the step at once: measured),
and each launcher stops its ranks as a SIGTERM does: they save at the same step and
end. So does the daemon's SIGTERM to the worker (a stop: the same save, and no requeue).
"""

from traind.daemon import preempt

if __name__ == "__main__":  # a node's launcher: first, as in slurm_job, for srun may pass the warning on at once
    preempt.catch()

import argparse  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from traind.daemon.launch import OUTCOME, Launch, LauncherStopped, RanksFailed, launch  # noqa: E402

NODES_ENV = "SLURM_JOB_NUM_NODES"


def in_allocation(nodes: int) -> str | None:
    """Why this process cannot run a job of NODES nodes here (not in a Slurm job of that
    many nodes), or None."""
    if not os.environ.get("SLURM_JOB_ID"):
        return (f"distributed.nodes = {nodes}: the daemon trains a job on this machine only; run it with the Slurm "
                "executor (traind daemon --executor slurm), or with traind run on each machine (or set nodes = 1)")
    have = os.environ.get(NODES_ENV, "1")
    if have != str(nodes):
        return f"distributed.nodes = {nodes}, and Slurm job {os.environ['SLURM_JOB_ID']} has {have} nodes"
    return None


def across(home_root: Path, name: str, folder: Path, processes: int, nodes: int, outcome: Path,
           failed) -> int:
    """In the batch job's worker, which holds FOLDER: train job NAME in PROCESSES ranks on
    each of the NODES nodes, and return the main rank's ending (worker.Exit); FAILED(code,
    why) records a failure of the ranks."""
    from traind.daemon.worker import Exit

    outcome.unlink(missing_ok=True)
    job, restart = os.environ["SLURM_JOB_ID"], os.environ.get("SLURM_RESTART_COUNT", "0") or "0"
    endpoint = f"{first_node()}:{free_port()}"
    argv = ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            "--export=ALL"]
    if os.environ.get("SLURM_CPUS_PER_TASK"):  # srun does not take it from the batch job in every Slurm version
        argv.append(f"--cpus-per-task={os.environ['SLURM_CPUS_PER_TASK']}")
    argv += [sys.executable, "-m", "traind.daemon.slurm_nodes", "--home", str(home_root), name,
             "--endpoint", endpoint, "--run-id", f"traind-{job}-{restart}"]
    if preempt.warned.is_set():
        return Exit.STOPPED  # warned before any rank started: nothing new to save, requeue now
    srun = subprocess.Popen(argv, env=dict(os.environ, **{OUTCOME: str(outcome)}))
    preempt.forward_to(srun.pid, signal.SIGUSR2)  # srun passes USR2 on to every launcher
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: preempt.pass_on())
    try:
        if preempt.warned.is_set():
            preempt.pass_on()  # came between the look above and forward_to
        returncode = srun.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if outcome.exists():
        return int(outcome.read_text())
    if returncode == 0:
        return Exit.STOPPED  # every launcher stopped before the ranks began
    if returncode > 128:
        failed(Exit.FAILED, f"a launcher of the ranks on {nodes} nodes died of signal {returncode - 128} (srun); "
                            "their output is in worker.out")
        return -(returncode - 128)
    return failed(Exit.FAILED, f"the ranks on {nodes} nodes failed (srun exit {returncode}); their output is in "
                               "worker.out")


def first_node() -> str:
    """This node, the first of the allocation, where the batch script runs: its name as
    Slurm knows it (resolvable on every node)."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def free_port() -> int:
    """A TCP port free on this node now (for the rendezvous's store, which this node's launcher hosts)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node(home_root: Path, name: str, endpoint: str, run_id: str) -> int:
    """One node's launcher: start its ranks and wait for them all; 0 once they ended cleanly."""
    import json

    from traind.daemon.rank import CLEAN
    from traind.daemon.worker import end_as

    preempt.forward_as(signal.SIGTERM)  # the warning stops the agent's ranks as a SIGTERM does
    if preempt.warned.is_set():
        return 0  # warned before the agent began: the worker ends the job as stopped
    from traind.daemon.home import Home
    from traind.jobs.folder import SPEC_FILE

    spec = json.loads((Home(home_root).job_dir(name) / SPEC_FILE).read_text())
    ranks = spec["distributed"]
    how = Launch(int(ranks.get("processes", 1)), int(ranks["nodes"]), endpoint, run_id,
                 outcome=Path(os.environ[OUTCOME]))
    try:
        code = launch(["worker", str(home_root), name], how)
    except RanksFailed as e:
        if e.signal_number:
            return end_as(-e.signal_number)
        return e.code or 1
    except LauncherStopped:
        return 0
    return 0 if code in CLEAN["worker"] else code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m traind.daemon.slurm_nodes", description=__doc__)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("name")
    parser.add_argument("--endpoint", required=True, help="HOST:PORT of the rendezvous: the first node's")
    parser.add_argument("--run-id", required=True)
    args = parser.parse_args(argv)
    return node(args.home.resolve(), args.name, args.endpoint, args.run_id)


if __name__ == "__main__":
    sys.exit(main())
