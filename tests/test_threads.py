"""Thread policy of the CPU stages (hi3d.threads): explicit counts win, auto follows what others leave free."""

import subprocess
import sys
import time

import pytest
import torch

from hi3d.threads import affinity_cpus, cpu_threads, threads_for


def test_auto_count_is_the_cores_others_leave_free():
    assert threads_for(2, 0.0, 2) == 2  # idle 2-core machine: both
    assert threads_for(2, 1.0, 2) == 1  # one CPU-bound process beside us: one thread on the free core
    assert threads_for(2, 0.5, 2) == 1 and threads_for(2, 0.2, 2) == 2  # >= 70% of a core taken counts as taken
    assert threads_for(2, 7.0, 2) == 1  # never fewer than one
    assert threads_for(16, 3.0, 8) == 8 and threads_for(16, 10.0, 8) == 6  # capped by torch's setting


def test_explicit_count_wins_and_is_restored():
    before = torch.get_num_threads()
    with cpu_threads(3) as threads:
        assert torch.get_num_threads() == 3
        assert threads.update() == 3 and [n for _, n in threads.history] == [3]
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads must be >= 0"):
        cpu_threads(-1)


def test_a_busy_process_beside_us_is_measured_and_leaves_one_thread_on_two_cores():
    cpus = affinity_cpus()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with cpu_threads(0, max_threads=len(cpus), probe=0.5, interval=0.0) as threads:
            time.sleep(0.5)
            others = threads.others_busy()  # a second window
        assert others >= 0.7, others  # the busy loop alone takes most of a core
        if len(cpus) == 2:
            assert threads.threads == 1
        assert 1 <= threads.threads <= len(cpus)
    finally:
        busy.kill()
        busy.wait()


_DENORMAL_PROBE = """
import json, sys
import torch
from hi3d.threads import cpu_threads, flush_denormals

def nonzero():  # 1e-30 * 1e-9 = 1e-39, a denormal float32; 2^22 elements split over all threads
    return int(((torch.full((1 << 22,), 1e-30) * 1e-9) != 0).sum())

torch.set_num_threads(2)
out = {"before": nonzero()}  # the pool exists from here on
with flush_denormals() as every:
    out["inside"], out["every"] = nonzero(), every
out["after"] = nonzero()
torch.set_num_threads(1)
with cpu_threads(3) as threads:  # the stage context; the pool grows to 3 threads inside it
    out["stage"], out["stage_all"] = nonzero(), threads.all_threads_flush
torch.set_num_threads(3)
out["stage_after"] = nonzero()
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="copying the FP environment to the pool: Linux")
def test_denormals_flush_on_every_thread_inside_a_stage_and_ieee_after():
    import json

    import numpy as np

    n = 1 << 22
    assert np.float32(1e-30) * np.float32(1e-9) != 0  # IEEE: a denormal, not zero
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-to-zero / denormals-are-zero mode")
    out = json.loads(subprocess.run([sys.executable, "-c", _DENORMAL_PROBE], check=True, capture_output=True,
                                    text=True).stdout)
    assert out["before"] == n and out["after"] == n and out["stage_after"] == n  # IEEE outside, on all threads
    assert out["inside"] == 0 and out["stage"] == 0  # flushed on every thread, not only the calling one
    assert out["every"] and out["stage_all"]
