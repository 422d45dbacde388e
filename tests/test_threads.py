"""The CPU thread count every command starts with (bytelm.device.thread_choice): every usable core on an idle
machine whatever the load average says, fewer only for cores other processes keep busy now, and what the user
or torchrun asked for first."""
from __future__ import annotations

import os

import pytest

import bytelm.device as device
from bytelm.errors import BytelmError


@pytest.fixture
def two_cores(monkeypatch):
    """A 2-core machine, nothing asked for, and a load average that says the machine was busy a minute ago."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(device, "_TORCH_DEFAULT_THREADS", 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 5.0, 5.0))


def fake_proc_stat(monkeypatch, busy_cores: float):
    """/proc/stat of a 2-CPU machine on which other processes keep `busy_cores` busy (100 jiffies a sample)."""
    samples = iter([(0, 0, 2), (int(100 * busy_cores / 2), 100, 2)])
    monkeypatch.setattr(device, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(device.time, "sleep", lambda s: None)


def test_an_idle_machine_with_a_high_load_average_gets_every_core(two_cores, monkeypatch):
    fake_proc_stat(monkeypatch, 0.1)
    n, why = device.thread_choice()
    assert n == 2 and why.startswith("every core this process may run on")


def test_cores_other_processes_keep_busy_now_are_left_out(two_cores, monkeypatch):
    fake_proc_stat(monkeypatch, 1.0)
    n, why = device.thread_choice()
    assert n == 1 and "kept 1.0 of the 2 cores busy just now" in why
    fake_proc_stat(monkeypatch, 2.0)  # fully busy: still one thread, never none
    assert device.thread_choice()[0] == 1


def test_threads_asked_for_win_over_the_measurement(two_cores, monkeypatch):
    fake_proc_stat(monkeypatch, 2.0)
    assert device.thread_choice(2) == (2, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun sets it
    monkeypatch.setattr(device.torch, "get_num_threads", lambda: 1)
    assert device.thread_choice() == (1, "OMP_NUM_THREADS=1")


def test_unreadable_proc_stat_means_every_core(two_cores, monkeypatch):
    monkeypatch.setattr(device, "_cpu_times", lambda: None)
    monkeypatch.setattr(device.time, "sleep", lambda s: None)
    assert device.thread_choice()[0] == 2


def test_the_affinity_mask_and_physical_cores_bound_the_count(two_cores, monkeypatch):
    fake_proc_stat(monkeypatch, 0.0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1}, raising=False)  # taskset -c 1
    assert device.thread_choice()[0] == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)  # SMT: 8 CPUs, 2 cores
    assert device.usable_cores() == 2


def test_busy_cores_reads_the_real_proc_stat():
    busy = device.busy_cores(0.05)
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1) + 1e-9


def test_set_threads_refuses_counts_out_of_range_in_one_line():
    with pytest.raises(BytelmError, match="--threads must be between 1 and"):
        device.set_threads(0)
    with pytest.raises(BytelmError, match="0 picks the free cores"):
        device.set_threads(-1, zero_is_automatic=True)


def test_a_run_on_an_idle_machine_trains_on_every_core_and_says_why(two_cores, monkeypatch, tmp_path, capsys):
    """The quick start's case: right after another command the load average is high, the cores are idle now."""
    import torch

    from bytelm.train.loop import TrainConfig, train
    fake_proc_stat(monkeypatch, 0.0)
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    before = torch.get_num_threads()
    try:
        train(TrainConfig.from_preset("tiny", data=str(tmp_path / "t.txt"), out=str(tmp_path / "m.pt"), steps=2,
                                      eval_every=2, plot=False, sample_bytes=0, cache_dir=str(tmp_path / "c")),
              progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    first = capsys.readouterr().out.splitlines()[0]
    assert "(2 threads: every core this process may run on" in first, first
