"""Spec i's orderings on its mini reproduction (afdcd/mini.py: procedural shapes, dilated conv nets at stride 4),
over three seeds, one thread (slow: one teacher and nine students on CPU, ~4-6 min):

* teacher > CE + KD student > CE student on the 3-seed mean: holds;
* the Af-DCD student >= the CE + KD student - 0.5 points: NOT reproduced, a strict xfail. Measured (README,
  "Spec i mini reproduction"): seeds 0-2 Af-DCD 61.02 vs CE + KD 61.76 (-0.75); seeds 0-9 -0.91 on the mean,
  Af-DCD below CE + KD on 8 of 10 seeds, with the three students of a seed on the same batches. The spec's
  prototype measured +1.4. If this starts to hold, the xfail turns into a failure: update the README then.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from afdcd.mini import format_table, run_mini

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def spec_i() -> tuple[dict[str, float], str]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # spec i: 1 thread (2 threads were ~20x slower on an oversubscribed machine)
    try:
        results = run_mini(seeds=SEEDS)
    finally:
        torch.set_num_threads(threads)
    table = format_table(results, SEEDS)
    print(table)
    assert all(len(v) == len(SEEDS) for k, v in results.items() if k != "teacher"), results
    return {k: statistics.mean(v) for k, v in results.items()}, table


@pytest.mark.slow
def test_teacher_beats_kd_beats_ce_on_the_three_seed_mean(spec_i: tuple[dict[str, float], str]) -> None:
    mean, table = spec_i
    assert mean["teacher"] > mean["kd"] > mean["ce"], table


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="spec i's Af-DCD >= CE + KD - 0.5 is not reproduced: -0.75 on seeds 0-2, "
                   "-0.91 on seeds 0-9 (afdcd/README.md, spec i section)")
def test_afdcd_is_at_least_kd_minus_half_a_point(spec_i: tuple[dict[str, float], str]) -> None:
    mean, table = spec_i
    assert mean["afdcd"] >= mean["kd"] - 0.5, table
