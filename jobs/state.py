"""Everything a save holds, and putting it back (CONTRACT §5.5).

A save is three files: the model's state_dict (each tied tensor once) and the optimizer's
tensors in safetensors, and `state.json`: the optimizer's other state, the scheduler,
the RNG states of python, numpy, torch and every CUDA device, the loop's Progress (step,
epoch, data position, best metric), and how tied tensors are tied again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from traind.jobs import data
from traind.jobs.errors import JobSpecError, Problem
from traind.jobs.train import Progress, Trainer
from traind.store.errors import CorruptSave
from traind.store.saves import SaveInfo, load_json, load_tensors

MODEL, OPTIMIZER, STATE = "model.safetensors", "optimizer.safetensors", "state.json"
EMA = "ema.safetensors"
"""train.ema: the moving average's weights, named as the model's (it loads into the job's module)."""
TIED_KEY = "traind.tied"  # model.safetensors metadata: {"alias": "stored key"} of tied tensors


def model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state_dict with each tied (shared-storage) tensor once, and the aliases dropped."""
    tensors, seen, aliases = {}, {}, {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
            tensors[key] = t
    return tensors, aliases


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Per-parameter state tensors as 'state.I.NAME', and the rest as JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in sd["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], doc: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in doc["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": doc["param_groups"]})


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict:
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(state), gauss],
            "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": _b64(torch.get_rng_state()),
            "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def set_rng_state(doc: dict) -> None:
    version, state, gauss = doc["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = doc["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(doc["torch"]))
    if doc["cuda"] and torch.cuda.is_available() and len(doc["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in doc["cuda"]])


def spec_hash(trainer: Trainer) -> str:
    """The job file's hash, its name left out: what trains, not what it is called (a sweep's
    trial taken up by another daemon continues another trial's saves under a name of its own)."""
    return hashlib.sha256(trainer.spec.model_dump_json(exclude={"name"}).encode()).hexdigest()


def capture(trainer: Trainer, copy: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
            ranks_rng: list[dict] | None = None) -> tuple[dict[str, tuple[dict, dict]], dict]:
    """The save's tensor files (copied by COPY, so training may go on) and its state.json;
    RANKS_RNG: every rank's RNG state, in rank order, when several train (rank 0's is `rng`)."""
    job = trainer.job
    model, tied = model_tensors(job.model)
    opt, opt_doc = optimizer_tensors(job.optimizer)
    ema = model_tensors(job.ema.module)[0] if job.ema is not None else {}
    copied = copy({**{f"model/{k}": t for k, t in model.items()}, **{f"optimizer/{k}": t for k, t in opt.items()},
                   **{f"ema/{k}": t for k, t in ema.items()}})
    meta = {"job": job.name, "step": str(trainer.progress.step), TIED_KEY: json.dumps(tied)}
    files = {MODEL: ({k: copied[f"model/{k}"] for k in model}, meta),
             OPTIMIZER: ({k: copied[f"optimizer/{k}"] for k in opt}, {"job": job.name})}
    state = {"progress": trainer.progress.as_dict(), "rng": ranks_rng[0] if ranks_rng else rng_state(),
             "optimizer": opt_doc,
             "scheduler": job.scheduler.state_dict() if job.scheduler is not None else None,
             "model": {"tied": tied}, "spec_sha256": spec_hash(trainer), "torch": torch.__version__}
    if job.ema is not None:
        files[EMA] = ({k: copied[f"ema/{k}"] for k in ema}, {**meta, "traind.ema": str(trainer.spec.train.ema)})
        state["ema"] = {"n_averaged": int(job.ema.n_averaged), "decay": trainer.spec.train.ema}
    if job.scaler is not None:
        state["scaler"] = job.scaler.state_dict()
    if ranks_rng and len(ranks_rng) > 1:
        state["ranks"] = {"size": len(ranks_rng), "rng": ranks_rng[1:]}
    return files, json.loads(json.dumps(state, default=_refuse))  # a deep copy, proven to be JSON


def _refuse(value):
    raise TypeError(f"cannot save {type(value).__name__} {value!r} as JSON (a scheduler holding a function?)")


def ranks_of(save: SaveInfo) -> int:
    """How many processes trained the job when SAVE was taken."""
    return load_json(save, STATE).get("ranks", {}).get("size", 1)


def rank_rng(doc: dict, rank: int) -> dict | None:
    """RANK's RNG state in the save's state.json DOC; None when the save was made by fewer
    ranks (the rank's streams then follow from the seed: `seed_rank`)."""
    if rank == 0:
        return doc["rng"]
    others = doc.get("ranks", {}).get("rng", [])
    return others[rank - 1] if rank - 1 < len(others) else None


def seed_rank(seed: int, rank: int) -> None:
    """RANK's own RNG streams (Dropout's draws differ between ranks), from the job's seed
    alone; rank 0 keeps the streams the build left, as one process alone would."""
    if rank:
        mixed = int(np.random.SeedSequence([seed, data.RANKS, rank]).generate_state(1, dtype=np.uint32)[0])
        random.seed(mixed)
        np.random.seed(mixed)
        torch.manual_seed(mixed)


def _restore_ema(job, save: SaveInfo, doc: dict, tied: dict) -> None:
    """The moving average as SAVE holds it; a save made without one (train.ema turned on
    since) starts it anew, from the weights, at the next step."""
    if job.ema is None:
        return
    if "ema" not in doc:
        job.ema.n_averaged.zero_()
        return
    try:
        tensors = load_tensors(save, EMA)
    except (OSError, ValueError, KeyError) as e:
        raise CorruptSave(f"save {save.id}: its EMA cannot be read back ({type(e).__name__}: {e})") from e
    for alias, key in tied.items():
        tensors[alias] = tensors[key]
    job.ema.module.load_state_dict(tensors)
    job.ema.n_averaged.fill_(doc["ema"]["n_averaged"])


def restore(trainer: Trainer, save: SaveInfo) -> None:
    """Put TRAINER back exactly as it was when SAVE was taken (a rank of several: its own
    RNG streams, or streams from the seed where the save has none for it)."""
    try:
        doc = load_json(save, STATE)
        model, tied = load_tensors(save, MODEL), doc["model"]["tied"]
        optimizer, progress = load_tensors(save, OPTIMIZER), Progress(**doc["progress"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptSave(f"save {save.id} cannot be read back ({type(e).__name__}: {e})") from e
    for alias, key in tied.items():
        model[alias] = model[key]
    job = trainer.job
    try:
        job.model.load_state_dict(model)
        restore_optimizer(job.optimizer, optimizer, doc["optimizer"])
        if job.scheduler is not None and doc["scheduler"] is not None:
            job.scheduler.load_state_dict(doc["scheduler"])
        _restore_ema(job, save, doc, tied)
        if job.scaler is not None and doc.get("scaler"):
            job.scaler.load_state_dict(doc["scaler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise JobSpecError([Problem(("model",), f"save {save.id} does not fit this job's model or optimizer: {e}",
                                    fix="run the job file the save was made with, or start in a new folder")]) from e
    rank = trainer.world.rank
    try:
        rng = rank_rng(doc, rank)
        if rng is None:
            seed_rank(trainer.spec.seed, rank)
        else:
            set_rng_state(rng)
    except (TypeError, ValueError, KeyError) as e:
        raise CorruptSave(f"save {save.id}: its RNG state cannot be restored ({e})") from e
    trainer.progress = progress
