"""The bench's arithmetic: series run in rotation, rows judged against their goals, and
intervals of paired ratios. Nothing here trains; bench/loop.py and the other cases do."""

from __future__ import annotations

import random
import statistics


def series(runs: dict, reps: int) -> dict[str, list[float]]:
    """Run each series REPS times, rotating (and every other cycle reversing) the order,
    so that each runs in each place equally often; steps per second of each run."""
    who = list(runs)
    rates: dict[str, list[float]] = {w: [] for w in who}
    steps = {}
    for rep in range(reps):
        order = who[rep % len(who):] + who[:rep % len(who)]
        for w in (order if rep // len(who) % 2 == 0 else order[::-1]):
            seconds, n = runs[w]()
            rates[w].append(n / seconds)
            steps[w] = n
    assert len(set(steps.values())) == 1, f"the loops did different work: {steps}"
    return rates


def row(case: str, ours: float, theirs: float, goal: float | None, noise: float, detail: str,
        higher: bool = True) -> dict:
    ratio = ours / theirs
    if goal is None:
        verdict = "-"
    elif (ratio >= goal) if higher else (ratio <= goal):
        verdict = "met"
    elif (ratio >= goal - noise) if higher else (ratio <= goal + noise):
        verdict = "within noise"
    else:
        verdict = "missed"
    return {"case": case, "traind": round(ours, 1), "baseline": round(theirs, 1), "ratio": round(ratio, 3),
            "goal": "-" if goal is None else f"{'>=' if higher else '<='} {goal}", "verdict": verdict,
            "detail": detail}


def interval(values: list[float], level: float = 0.9, resamples: int = 2000) -> tuple[float, float]:
    """A bootstrap interval of the median of VALUES at LEVEL (seeded: the same values give
    the same interval)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    cut = int(resamples * (1 - level) / 2)
    return medians[cut], medians[-cut - 1]


def paired_row(case: str, ratios: list[float], again: list[float], goal: float, detail: str) -> dict:
    """A row whose ratio is the median of per-round ratios, judged by its interval: met when
    the whole interval clears GOAL, missed when none of it does."""
    ratio, (low, high), (aa_low, aa_high) = statistics.median(ratios), interval(ratios), interval(again)
    verdict = "met" if low >= goal else "missed" if high < goal else "within noise"
    return {"case": case, "traind": round(ratio, 3), "baseline": 1.0, "ratio": round(ratio, 3), "goal": f">= {goal}",
            "verdict": verdict, "detail": f"{detail}; 90% interval {low:.3f}-{high:.3f}; A/A "
                                          f"{statistics.median(again):.3f} ({aa_low:.3f}-{aa_high:.3f})"}
