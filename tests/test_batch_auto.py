"""BATCH_SIZE=auto picks the fastest batch under the memory cap (issue 22): candidate sizes, the
pure selection on stub throughput tables, and the real timing function on the CPU (no GPU needed)."""

import pytest
import torch

from backend.engine.device import (
    CPU_BATCH_SIZE, BatchChoice, candidate_sizes, eager_probing, fastest_batch_size, measure_throughput,
    probe_batch_size, time_batch_sizes,
)


def stub_measure(table: dict[int, float]):
    """A stub measurement: returns images/s from ``table`` and records the sizes asked for."""
    asked: list[int] = []

    def measure(size: int) -> float:
        asked.append(size)
        return table[size]

    return measure, asked


# ------------------------------------------------------------------ candidates

@pytest.mark.parametrize("cap, sizes", [
    (1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (8, [1, 2, 4, 8]), (14, [1, 2, 4, 8, 14]), (32, [1, 2, 4, 8, 16, 32]),
])
def test_candidates_are_powers_of_two_up_to_the_cap_plus_the_cap(cap, sizes):
    assert candidate_sizes(cap) == sizes


def test_a_cap_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        candidate_sizes(0)


# ------------------------------------------------------------------ selection on stub tables

def test_the_fastest_size_wins():
    measure, asked = stub_measure({1: 5.0, 2: 8.0, 4: 11.0, 8: 12.0, 14: 11.5})
    size, table = fastest_batch_size([1, 2, 4, 8, 14], measure)
    assert size == 8
    assert asked == [1, 2, 4, 8, 14] and table == {1: 5.0, 2: 8.0, 4: 11.0, 8: 12.0, 14: 11.5}


def test_the_smaller_size_wins_within_the_tolerance():
    measure, _ = stub_measure({1: 5.0, 2: 8.0, 4: 9.8, 8: 10.0, 16: 10.1})
    assert fastest_batch_size([1, 2, 4, 8, 16], measure, tolerance=0.03)[0] == 4  # 9.8 >= 0.97 * 10.1
    assert fastest_batch_size([1, 2, 4, 8, 16], measure, tolerance=0.0)[0] == 16


def test_probing_stops_once_a_size_is_clearly_slower():
    measure, asked = stub_measure({1: 5.0, 2: 9.0, 4: 10.0, 8: 8.0, 16: 20.0})  # 16 would win, if tried
    size, table = fastest_batch_size([1, 2, 4, 8, 16], measure, stop_below=0.9)
    assert size == 4 and asked == [1, 2, 4, 8] and 16 not in table


def test_probing_stops_at_a_size_that_does_not_run():
    measure, asked = stub_measure({1: 5.0, 2: 9.0, 4: 0.0, 8: 12.0})  # 0.0: out of memory at 4
    assert fastest_batch_size([8, 4, 2, 1], measure) == (2, {1: 5.0, 2: 9.0, 4: 0.0})
    assert asked == [1, 2, 4]


def test_nothing_runs_gives_the_smallest_size():
    measure, _ = stub_measure({2: 0.0, 4: 1.0})
    assert fastest_batch_size([2, 4], measure)[0] == 2


def test_the_time_budget_bounds_probing():
    now = [0.0]

    def measure(size: int) -> float:  # a stub measurement that takes 10 stub-clock seconds per size
        now[0] += 10.0
        return float(size)

    size, table = fastest_batch_size([1, 2, 4, 8], measure, budget_s=25.0, clock=lambda: now[0])
    assert table == {1: 1.0, 2: 2.0, 4: 4.0} and size == 4  # 8 not started: 30 s >= 25 s


@pytest.mark.parametrize("kwargs", [{"candidates": []}, {"candidates": [0, 1]}, {"tolerance": 1.0},
                                    {"stop_below": 0.0}])
def test_bad_arguments_say_what_to_fix(kwargs):
    args = {"candidates": [1, 2], "measure": lambda size: 1.0, **kwargs}
    with pytest.raises(ValueError):
        fastest_batch_size(args.pop("candidates"), args.pop("measure"), **args)


# ------------------------------------------------------------------ the real timing function

def test_real_timing_of_a_matmul_on_the_cpu_returns_a_candidate():
    device = torch.device("cpu")
    weight = torch.randn(64, 64)

    def forward(batch_size: int) -> None:
        torch.randn(batch_size, 32, 64) @ weight

    assert measure_throughput(device, forward, 2, runs=2) > 0
    choice = time_batch_sizes(device, forward, 6, budget_s=None, runs=2)
    assert choice.cap == 6 and choice.size in candidate_sizes(6)
    assert choice.size in choice.images_per_s and set(choice.images_per_s) <= set(candidate_sizes(6))
    assert all(rate > 0 for rate in choice.images_per_s.values()) and choice.table().count(":") >= 1


def test_real_timing_of_the_tiny_engine_probe_returns_a_candidate(engine):
    choice = time_batch_sizes(torch.device("cpu"), engine.probe, 3, budget_s=None, runs=1)
    assert choice.size in candidate_sizes(3) and choice.size in choice.images_per_s
    assert engine.batch_size not in (None, 0)  # probe restores the engine's own batch size


def test_the_cpu_keeps_its_fixed_size_without_probing():
    def forward(batch_size: int) -> None:
        raise AssertionError("the CPU must not probe")

    assert probe_batch_size(torch.device("cpu"), forward) == BatchChoice(CPU_BATCH_SIZE, CPU_BATCH_SIZE, {})


def test_compiled_functions_run_eagerly_while_probing():
    compiled_graphs: list[object] = []

    def recording_backend(graph, example_inputs):  # a stub compiler backend that records compiles
        compiled_graphs.append(graph)
        return graph.forward

    function = torch.compile(lambda x: x * 2 + 1, backend=recording_backend)
    with eager_probing():
        assert torch.equal(function(torch.ones(3)), torch.full((3,), 3.0))
    assert compiled_graphs == []


def test_the_cuda_path_caps_by_memory_then_times_below_the_cap(monkeypatch, caplog):
    """The CUDA branch without a GPU: stub peak memory and free memory, a real (no-op) forward."""
    from backend.engine import device as device_module

    gib = 2**30
    stub_peaks = {1: 1 * gib, 2: gib + gib // 2}  # 0.5 GiB per image, 0.5 GiB fixed
    monkeypatch.setattr(device_module, "measure_peak_bytes", lambda device, forward, size: stub_peaks[size])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4 * gib, 80 * gib))
    monkeypatch.setattr(device_module, "_sync", lambda device: None)
    ran: list[int] = []
    with caplog.at_level("INFO", logger="backend.engine.device"):
        choice = probe_batch_size(torch.device("cuda"), ran.append, budget_s=None)
    assert choice.cap == 5  # (0.8 * 4 - 0.5) / 0.5 = 5.4
    assert choice.size in candidate_sizes(5) and set(ran) <= {1, 2, 4, 5} and 1 in ran
    assert "BATCH_SIZE=auto" in caplog.text and "memory cap 5" in caplog.text
