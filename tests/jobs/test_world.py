"""The world a run trains in: alone it agrees with itself and costs nothing; as ranks of a
real gloo process group (two processes here), every rank acts on one decision."""

import os
import subprocess
import sys

import torch.multiprocessing as mp

from tests.conftest import free_port
from traind.jobs.world import Decision, Ranks, World


def test_one_process_alone_agrees_with_itself_and_imports_no_torch():
    decision = Decision({"auto"}, "after_save", "a note", "r.json")
    assert World().agree(decision) is decision and World().is_main
    assert World().sum([1.5, 2.0]) == [1.5, 2.0] and World().gather("x") == ["x"] and World().share(3) == 3
    code = "import sys, traind.jobs.world; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_a_stronger_stop_wins_and_a_weaker_one_does_not_undo_it():
    d = Decision()
    d.stop_at("now")
    d.stop_at("after_save")
    assert d.stop == "now"


def _rank(rank: int, port: int, found) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    world = Ranks(rank, 2, rank)
    try:
        # the main rank's policy says a best save is due; a signal reached rank 1 alone
        mine = Decision({"auto", "best"}, None) if rank == 0 else Decision({"manual"}, "after_save")
        agreed = world.agree(mine)
        found[rank] = (sorted(agreed.kinds), agreed.stop, world.sum([rank + 1.0])[0],
                       world.gather(f"rng of {rank}"), world.share(f"chosen by {rank}"))
    finally:
        world.close()


def test_ranks_agree_on_the_main_ranks_save_kinds_and_the_strongest_stop():
    with mp.Manager() as manager:
        found = manager.dict()
        mp.spawn(_rank, args=(free_port(), found), nprocs=2, join=True)
        found = dict(found)
    assert found[0] == (["auto", "best"], "after_save", 3.0, ["rng of 0", "rng of 1"], "chosen by 0")
    assert found[1] == (["auto", "best"], "after_save", 3.0, None, "chosen by 0")  # rank 1's "manual" is not the policy


def test_a_rank_ends_with_its_code_and_what_it_wrote_flushed_past_the_interpreter_teardown(tmp_path):
    """end_rank skips atexit and finalizers (where gloo's threads may abort), yet nothing
    said to a pipe or a log is lost."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import atexit, logging, sys\n"
        "from traind.jobs.world import end_rank\n"
        f"logging.basicConfig(filename={str(tmp_path / 'log')!r}, level=logging.INFO)\n"
        "logging.info('logged')\n"
        "atexit.register(lambda: print('teardown ran'))\n"
        "sys.stdout.write('said, with no newline')\n"
        "sys.stderr.write('warned')\n"
        "end_rank(3)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "said, with no newline", "warned")
    assert "logged" in (tmp_path / "log").read_text()
