"""`traind plot`: a job's loss and metric curves as a PNG (matplotlib, an optional extra)."""

from __future__ import annotations

from pathlib import Path

from traind.jobs.metrics import read_metrics
from traind.store.errors import TraindError


class PlotUnavailable(TraindError):
    pass


def plot(folder: Path, out: Path, title: str) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotUnavailable("plotting needs matplotlib: pip install 'traind[plot]'") from e
    records = read_metrics(folder)
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    if not steps and not epochs:
        raise PlotUnavailable(f"{folder} has no metrics yet; plot again once it has trained a little")
    fig, (losses, accuracy) = plt.subplots(1, 2, figsize=(11, 4))
    losses.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6, label="step loss")
    for key in ("train_loss", "val_loss"):
        points = [(r["step"], r[key]) for r in epochs if key in r]
        if points:
            losses.plot(*zip(*points), marker="o", ms=3, label=key)
    losses.set(xlabel="step", ylabel="loss", title=f"{title}: loss")
    losses.legend()
    points = [(r["epoch"], r["val_acc"]) for r in epochs if "val_acc" in r]
    if points:
        accuracy.plot(*zip(*points), marker="o", ms=3, color="tab:green", label="val_acc")
        accuracy.set(xlabel="epoch", ylabel="accuracy", title=f"{title}: validation accuracy", ylim=(0, 1))
    else:
        accuracy.plot([r["epoch"] for r in epochs], [r["lr"] for r in epochs], marker="o", ms=3, label="lr")
        accuracy.set(xlabel="epoch", ylabel="learning rate", title=f"{title}: learning rate")
    accuracy.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
