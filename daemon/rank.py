"""One rank of a job that traind launched (daemon/launch.py), in a process of its own:

    python -m traind.daemon.rank worker HOME NAME     (a rank of the daemon's worker)
    python -m traind.daemon.rank run FILE FOLDER      (a rank of `traind run`)

It trains as the worker or `traind run` would in one process, inside the world that the
environment describes. The main rank tells the launcher how the run ended; a rank exits
0 once its run ended cleanly (done, stopped, paused, cancelled), and with its status
otherwise, so that the agent ends the world at once rather than leave the others waiting
for it in their next all-reduce.
"""

from __future__ import annotations

import sys
from pathlib import Path

CLEAN = {"worker": {0, 75, 76, 77}, "run": {0}}  # worker.Exit: DONE, STOPPED, PAUSED, CANCELLED


def main(argv: list[str] | None = None) -> int:
    kind, first, second = argv if argv is not None else sys.argv[1:]
    from traind.daemon import launch
    from traind.jobs import world

    if kind == "worker":
        from traind.daemon.home import Home
        from traind.daemon.worker import run

        code = int(run(Home(Path(first)), second))
    else:
        from traind.daemon.foreground import rank_run

        code = rank_run(first, second)
    if world.main_in_environment():
        launch.tell(code)
    return 0 if code in CLEAN[kind] else code


if __name__ == "__main__":
    from traind.jobs.world import end_rank

    end_rank(main())
