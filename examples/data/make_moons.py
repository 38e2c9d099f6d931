"""Writes moons.csv: two interleaved half circles with noise, labels as text.

The file is committed; run this only to regenerate it (it is deterministic).
"""

import csv
import math
import random
from pathlib import Path


def main(samples: int = 400, noise: float = 0.15, seed: int = 7) -> None:
    rng = random.Random(seed)
    rows = []
    for i in range(samples):
        upper = i % 2 == 0
        t = rng.uniform(0, math.pi)
        x, y = (math.cos(t), math.sin(t)) if upper else (1 - math.cos(t), 0.5 - math.sin(t))
        rows.append((round(x + rng.gauss(0, noise), 4), round(y + rng.gauss(0, noise), 4),
                     "upper" if upper else "lower"))
    with open(Path(__file__).with_name("moons.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["x1", "x2", "moon"])
        writer.writerows(rows)


if __name__ == "__main__":
    main()
