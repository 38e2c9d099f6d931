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



def plot_sweep(study, out: Path, title: str) -> Path:
    """A sweep's optimisation history (each trial's objective, pruned ones at their last
    epoch, the best so far) and its parameters' importances (Optuna's fANOVA), as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotUnavailable("plotting needs matplotlib: pip install 'traind[plot]'") from e
    import optuna

    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None]
    if not finished:
        raise PlotUnavailable(f"sweep {title} has no finished trial yet; plot again once one has finished")
    fig, (history, importance) = plt.subplots(1, 2, figsize=(12, 4.5))
    minimize = study.direction.name == "MINIMIZE"
    best, line = [], None
    for t in finished:
        line = t.value if line is None else (min(line, t.value) if minimize else max(line, t.value))
        best.append(line)
    history.scatter([t.number for t in finished], [t.value for t in finished], s=18, label="finished trial")
    pruned = [t for t in trials if t.state.name == "PRUNED" and t.intermediate_values]
    if pruned:
        history.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                        s=22, marker="x", color="tab:red", label="pruned (at its last epoch)")
    history.step([t.number for t in finished], best, where="post", color="tab:orange", label="best so far")
    history.set(xlabel="trial", ylabel="objective", title=f"{title}: optimisation history")
    history.legend()
    params = {k for t in finished for k in t.params}
    if len(finished) >= 2 and len(params) >= 2:
        found = optuna.importance.get_param_importances(study)
        names = list(found)[::-1]
        importance.barh(range(len(names)), [found[n] for n in names], color="tab:blue")
        importance.set_yticks(range(len(names)), names)
        importance.set(xlabel="importance (fANOVA)")
    else:
        importance.text(0.5, 0.5, "importances need 2 finished trials and 2 parameters", ha="center",
                        transform=importance.transAxes)
    importance.set(title=f"{title}: parameter importances")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
