"""Warm workers: a job's worker forked from a template process that has paid the imports.

A cold worker (`python -m traind.daemon.worker`) spends about 2.5 s of its start importing
torch and the lazy imports of its first optimizer step. The daemon is long-lived, so it
keeps one template process (`python -m traind.daemon.warm FD`) that has imported torch and
traind and run a throwaway optimizer step on the CPU, once; each job's worker is a fork of
it (the fork-server idea of multiprocessing's forkserver, written small, as the template
must answer with the fork's exit status as Popen would).

What makes it safe:
- **A fresh process per job**: the template never runs a job; each worker is a new fork
  of the template as it stood after its warm-up, so nothing one job changes (RNG, the
  default dtype, `torch.set_*` flags, threads, environment, cwd) reaches the next. The
  warm-up leaves the template as a cold import leaves a process: its torch RNG state is
  put back, its thread pool is never started (one thread), CUDA is never touched (CUDA
  does not survive a fork: the child initialises it), and `random`/numpy are seeded
  again from the OS in each child, as a cold start seeds them.
- **The same process contract**: the child is the worker (its `main`, its exit status or
  the signal that killed it, told to the daemon through the template as waitpid saw it,
  so an OOM kill reads as SIGKILL as before); it dies with its parent (PR_SET_PDEATHSIG,
  SIGTERM: it saves and stops), and the template dies with the daemon (SIGKILL), so a
  worker never trains on unsupervised; the job's output and environment are the ones a
  cold worker gets; its command line reads as a cold worker's (setproctitle).
- **Never waiting on it**: a template not ready yet, dead or not answering within
  `ANSWER_WAIT` is not waited for: the job starts cold, and a new template is started.
  A template that dies takes its workers with it (they get SIGTERM, save and stop); their
  handles then read STOPPED, and the daemon queues them again.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from traind.daemon import liveness

log = logging.getLogger("traind.daemon")

ANSWER_WAIT = 5.0
"""Seconds a start waits for the template's answer before it starts the job cold."""
STOPPED = 75  # worker.Exit.STOPPED, without importing the worker (and torch) into the daemon
MESSAGE = 65536
DAEMON_ENV = "TRAIND_WARM_DAEMON"
WARM_MODULES = ("random", "numpy", "safetensors.torch", "traind.daemon.worker", "traind.jobs.train",
                "traind.jobs.build", "setproctitle")
"""What the template imports: a worker and what its job builds (the worker imports the rest)."""


def _send(sock: socket.socket, doc: dict, fds: list[int] = ()) -> None:
    socket.send_fds(sock, [json.dumps(doc).encode()], list(fds))


# ---- the template (its own process) -------------------------------------------------------

def warm_up() -> None:
    """Import what every job needs and run one optimizer step, leaving the process as a
    cold import leaves it (its RNG state; no thread pool started; no CUDA)."""
    import importlib

    import torch

    for module in WARM_MODULES:
        importlib.import_module(module)

    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = torch.nn.Linear(4, 2)
    for optimizer in (torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.AdamW(model.parameters())):
        model(torch.zeros(3, 4)).sum().backward()
        optimizer.step()  # the lazy imports of a first step (torch._dynamo, the foreach kernels)
        optimizer.zero_grad()
    torch.set_num_threads(threads)  # what a cold process reads; the child's job sets its own
    torch.set_rng_state(rng)


def serve(sock: socket.socket) -> None:
    """The template's loop: fork a worker for each request, tell its pid, then how it ended."""
    daemon = int(os.environ.get(DAEMON_ENV, "0"))
    liveness.die_with_parent(signal.SIGKILL)
    if daemon and os.getppid() != daemon:  # the daemon died before the line above
        return
    warm_up()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    _send(sock, {"ready": os.getpid()})
    while True:
        readable, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 4096)
        while True:  # every child that ended, told once
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            _send(sock, {"ended": pid, "code": os.waitstatus_to_exitcode(status)})
        if sock in readable:
            data, fds, _, _ = socket.recv_fds(sock, MESSAGE, 1)
            if not data:
                return  # the daemon is gone
            request = json.loads(data)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                os.close(wake_r)
                os.close(wake_w)
                _child(sock, request, fds[0])
            os.close(fds[0])
            _send(sock, {"started": request["id"], "pid": pid})


def _child(sock: socket.socket, request: dict, out: int) -> None:
    """In the fork: become the job's worker, as a cold start would have made it; never returns."""
    code = 1
    try:
        parent = os.getppid()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        sock.close()
        liveness.die_with_parent(signal.SIGTERM)
        if os.getppid() != parent:  # the template died before the line above
            os.kill(os.getpid(), signal.SIGTERM)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        import random

        import numpy

        random.seed()
        numpy.random.seed()
        argv = request["argv"]
        import setproctitle

        setproctitle.setproctitle(" ".join(argv))  # what ps and pgrep show of a cold worker
        from traind.daemon import worker

        code = worker.end_as(worker.main(argv[3:]))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001  (what a cold worker's interpreter would print)
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    import setproctitle

    # Before anything changes the environment: setproctitle takes the room for a title
    # (argv's and the environment's memory, the environment moved aside) at its first
    # call; made first in a child, after its environment was replaced, it garbles the title.
    setproctitle.getproctitle()
    serve(socket.socket(fileno=int(sys.argv[1])))


# ---- the daemon's side ----------------------------------------------------------------------

class WarmHandle:
    """A warm worker, as the supervisor sees it (the Handle of daemon/executor.py)."""

    warm = True

    def __init__(self, pid: int, template: Template):
        self.pid, self.template = pid, template
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.template.pump()
            self.returncode = self.template.ended.pop(self.pid, None)
            if self.returncode is None and self.template.dead and not _alive(self.pid):
                self.returncode = STOPPED  # its template died, and it with it (SIGTERM: it saved and stopped)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired("warm worker", timeout)
            self.template.pump(0.05 if left is None else min(0.05, left))
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Template:
    """One template process, from the daemon's side: its socket, and what it told."""

    def __init__(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([sys.executable, "-m", "traind.daemon.warm", str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                     env={**os.environ, DAEMON_ENV: str(os.getpid())})
        theirs.close()
        self.sock = ours
        self.ready = False
        self.dead = False
        self.started: dict[int, int] = {}
        self.ended: dict[int, int] = {}

    def pump(self, wait: float = 0.0) -> None:
        """Read what the template told, waiting up to WAIT seconds for the first message."""
        while not self.dead:
            readable, _, _ = select.select([self.sock], [], [], wait)
            if not readable:
                return
            wait = 0.0
            try:
                data = self.sock.recv(MESSAGE)
            except OSError:
                data = b""
            if not data:
                self.close()
                return
            doc = json.loads(data)
            if "ready" in doc:
                self.ready = True
            elif "started" in doc:
                self.started[doc["started"]] = doc["pid"]
            elif "ended" in doc:
                self.ended[doc["ended"]] = doc["code"]

    def start(self, request: dict, out: IO[bytes]) -> int | None:
        """The pid of a worker forked for REQUEST, or None when the template did not answer
        in time (it is then closed)."""
        try:
            _send(self.sock, request, [out.fileno()])
        except OSError:
            self.close()
            return None
        deadline = time.monotonic() + ANSWER_WAIT
        while request["id"] not in self.started and not self.dead and time.monotonic() < deadline:
            self.pump(deadline - time.monotonic())
        pid = self.started.pop(request["id"], None)
        if pid is None:
            self.close()
        return pid

    def close(self) -> None:
        if not self.dead:
            self.dead = True
            self.sock.close()
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()


def _ended_how(code: int | None) -> str:
    if code is None:
        return "closed"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"signal {-code}"
    return f"exit {code}"


class WarmWorkers:
    """The spawn of LocalExecutor (argv, out, env) that forks workers from a template,
    starting a job cold (COLD) whenever the template is not ready or does not answer."""

    def __init__(self, cold):
        self.cold = cold
        self.template: Template | None = None
        self.serial = 0
        self._told: tuple[int, bool] | None = None  # (the template's pid, ready): what the log said last

    def prepare(self) -> None:
        """Start the template, so that it is warm by the first job."""
        if self.template is None or self.template.dead:
            self.template = Template()

    def tend(self) -> None:
        """Read what the template told; one that died is replaced now, not at the next job."""
        template = self.template
        if template is None:
            return
        template.pump()
        if template.dead:
            log.warning("warm template pid %d ended (%s); starting another", template.proc.pid,
                        _ended_how(template.proc.returncode))
            self.template = None
            self.prepare()
        elif template.ready and self._told != (template.proc.pid, True):
            log.info("warm template pid %d ready: jobs start as its forks", template.proc.pid)
            self._told = (template.proc.pid, True)

    def __call__(self, argv: list[str], out: IO[bytes], env: dict[str, str]):
        self.prepare()
        template = self.template
        template.pump()
        if template.ready and argv[1:3] == ["-m", "traind.daemon.worker"]:
            self.serial += 1
            pid = template.start({"id": self.serial, "argv": argv, "env": env, "cwd": os.getcwd()}, out)
            if pid is not None:
                return WarmHandle(pid, template)
            self.prepare()  # it died or hung: a new one, warm by the next job
        return self.cold(argv, out, env)

    def close(self) -> None:
        if self.template is not None:
            self.template.close()


if __name__ == "__main__":
    main()
