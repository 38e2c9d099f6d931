from pathlib import Path

import pytest

from traind.store.retention import Policy, best_save, due_at_epoch_end, due_at_step, improves, ranked_bests, to_purge
from traind.store.saves import SaveInfo


def info(seq, kinds, metric=None, epoch=0):
    return SaveInfo(f"{seq:06d}-s{seq}", seq, seq, epoch, tuple(kinds), {} if metric is None else {"val_loss": metric},
                    "", 0, None, Path("."))


def ids(saves):
    return sorted(s.seq for s in saves)


def test_autosaves_rotate_through_keep_last():
    saves = [info(i, ["auto"]) for i in range(1, 7)]
    assert ids(to_purge(Policy(keep_last=3), saves)) == [1, 2, 3]


def test_bests_keep_the_top_k_by_the_monitor():
    saves = [info(1, ["best"], 0.9), info(2, ["best"], 0.5), info(3, ["best"], 0.7), info(4, ["auto"])]
    assert ids(to_purge(Policy(keep_best=2, keep_last=1), saves)) == [1]
    assert ids(to_purge(Policy(keep_best=1, keep_last=1), saves)) == [1, 3]
    maxed = [info(1, ["best"], 0.9), info(2, ["best"], 0.5), info(3, ["auto"])]
    assert ids(to_purge(Policy(keep_best=1, keep_last=1, mode="max"), maxed)) == [2]


def test_manual_milestone_and_final_are_kept_for_good():
    saves = [info(1, ["manual"]), info(2, ["milestone"]), info(3, ["final"]), info(4, ["auto"]), info(5, ["auto"])]
    assert ids(to_purge(Policy(keep_last=1), saves)) == [4]


def test_the_newest_and_the_protected_save_are_never_purged():
    saves = [info(1, ["auto"]), info(2, ["best"], 0.1), info(3, [])]
    assert ids(to_purge(Policy(keep_last=1, keep_best=0), saves, protect={"000001-s1"})) == [2]
    assert to_purge(Policy(keep_last=1), [info(9, [])]) == []


def test_a_save_with_several_kinds_lives_while_any_keeps_it():
    saves = [info(1, ["auto", "best"], 0.1), info(2, ["auto"]), info(3, ["auto"])]
    assert ids(to_purge(Policy(keep_last=1, keep_best=1), saves)) == [2]


def test_cadence_by_steps_minutes_epochs_and_milestones():
    p = Policy(every_steps=5, every_epochs=2, every_minutes=1, keep_every_epochs=3, keep_best=0)
    assert due_at_step(p, 10, 0) == {"auto"} and due_at_step(p, 11, 0) == set()
    assert due_at_step(p, 11, 61) == {"auto"}
    assert due_at_epoch_end(p, 2, 11, 0, None, []) == {"auto"}
    assert due_at_epoch_end(p, 3, 11, 0, None, []) == {"milestone"}
    assert due_at_epoch_end(p, 6, 11, 0, None, []) == {"auto", "milestone"}
    off = Policy(every_epochs=0, every_minutes=0, keep_best=0)
    assert due_at_epoch_end(off, 4, 7, 10**6, 0.1, []) == set()


def test_best_candidates_beat_the_kept_bests_after_best_after_epoch():
    p = Policy(keep_best=2, every_epochs=0, every_minutes=0, best_after_epoch=2)
    kept = [info(1, ["best"], 0.5, epoch=2), info(2, ["best"], 0.3, epoch=3)]
    assert due_at_epoch_end(p, 1, 1, 0, 0.1, []) == set()  # before best_after_epoch
    assert due_at_epoch_end(p, 2, 1, 0, 0.1, []) == {"best"}
    assert due_at_epoch_end(p, 3, 1, 0, 0.4, kept) == {"best"}  # beats the worse of the two kept
    assert due_at_epoch_end(p, 3, 1, 0, 0.6, kept) == set()
    assert due_at_epoch_end(p, 3, 1, 0, float("nan"), []) == set()


def test_policy_refuses_keep_last_zero():
    with pytest.raises(ValueError, match="keep_last must be at least 1"):
        Policy(keep_last=0)


def test_best_is_one_rule_ties_to_the_older_never_non_finite_never_before_best_after_epoch():
    p = Policy(keep_best=1, best_after_epoch=2)
    saves = [info(1, ["best"], 0.3, epoch=1),  # before best_after_epoch (a job file changed since): not a best
             info(2, ["best"], float("nan"), epoch=2), info(3, ["best"], 0.4, epoch=3),
             info(4, ["best"], 0.4, epoch=4), info(5, ["auto"], 0.1, epoch=5)]  # not a best save
    assert best_save(p, saves).seq == 3  # the tie goes to the older: it was best first
    assert [s.seq for s in ranked_bests(p, saves)] == [3, 4]
    assert ids(to_purge(p, saves)) == [1, 2, 4]  # (5 is the newest)
    assert improves(p, 0.4, 3, None) and not improves(p, 0.4, 4, 0.4)  # a tie is no improvement
    assert not improves(p, float("inf"), 3, None) and not improves(p, 0.1, 1, None) and not improves(p, True, 3, None)
    assert best_save(Policy(mode="max"), [info(1, ["best"], 0.4), info(2, ["best"], 0.4)]).seq == 1
