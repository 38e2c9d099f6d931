"""The writer of saves: one job at a time, behind training or on its thread."""

import threading

import pytest

from traind.store.snapshot import Writer


@pytest.mark.parametrize("here", [False, True])
def test_a_job_s_result_and_error_come_from_wait_wherever_it_ran(here):
    writer, ran_on = Writer(), []
    writer.submit(lambda: ran_on.append(threading.current_thread()) or 7, here)
    assert writer.wait() == 7
    assert (ran_on[0] is threading.current_thread()) == here

    def fail():
        raise OSError(5, "Input/output error")

    writer.submit(fail, here)  # not raised here: training goes on to the wait
    with pytest.raises(OSError, match="Input/output error"):
        writer.wait()
    assert writer.wait() is None  # told once


def test_a_job_waits_for_the_one_in_flight():
    writer, order, release = Writer(), [], threading.Event()
    writer.submit(lambda: release.wait(5) and order.append("behind"))
    threading.Timer(0.2, release.set).start()
    writer.submit(lambda: order.append("here"), here=True)
    assert order == ["behind", "here"]
