"""Where a job's samples come from, how they are split, and in which order they arrive.

Everything random here draws from generators seeded by (job seed, purpose, epoch), never
from the global RNG, so that (a) the data, the split and each epoch's order are fixed by
the seed, and (b) a loop continued at batch k of an epoch sees exactly the batches the
uninterrupted loop saw from k on, while the global RNG (Dropout) sees the same draws.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from traind.jobs import names
from traind.jobs.errors import JobSpecError, Problem
from traind.jobs.spec import DataSpec

# Purposes of the seeded generators: one stream each, so one cannot shift another.
DATA, SPLIT, ORDER, WORKERS, RANKS = 1, 2, 3, 4, 5  # RANKS: each rank's own RNG streams (jobs/state.py)


def seeded(*keys: int) -> torch.Generator:
    """A torch generator whose state follows from KEYS alone (numpy's SeedSequence mixing)."""
    state = np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class TensorPairs(Dataset):
    """In-memory (x, y) tensors that hand out whole batches with one gather each."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __getitems__(self, indices: list[int]):
        return self.batch(torch.as_tensor(indices))

    def batch(self, index: torch.Tensor, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.x[index], self.y[index]
        return (x.pin_memory(), y.pin_memory()) if pin and not x.is_cuda else (x, y)

    @property
    def nbytes(self) -> int:
        return self.x.nbytes + self.y.nbytes

    def to(self, device: torch.device) -> TensorPairs:
        return TensorPairs(self.x.to(device), self.y.to(device))


def keep_batch(batch):
    """collate_fn for TensorPairs: its __getitems__ already made the batch."""
    return batch


@dataclass(frozen=True)
class Splits:
    train: Dataset
    val: Dataset | None
    description: str


def load_splits(spec: DataSpec, seed: int, python_path: list[str]) -> Splits:
    """The job's train and validation sets, or JobSpecError naming what is wrong."""
    if spec.source == "synthetic":
        x, y = synthetic(spec, seed)
    elif spec.source == "csv":
        x, y = read_csv(spec)
    elif spec.source in ("npz", "pt"):
        x, y = read_arrays(spec)
        _check_finite(x, y, spec)
    else:
        return _factory_splits(spec, seed, python_path)
    x, y = _shape_for_task(x, y, spec)
    whole = TensorPairs(x, y)
    train, val = split(whole, spec.val_fraction, seed)
    what = f"{spec.source} {spec.task}, {len(train)} train / {len(val) if val else 0} val samples"
    if spec.source == "csv":
        what += f", target {csv_target(spec)}"
    return Splits(train, val, what)


def _check_finite(x: torch.Tensor, y: torch.Tensor, spec: DataSpec) -> None:
    """NaN or infinity in the data trains into NaN losses (or a val_loss of nan every epoch,
    and no best save): refuse it, naming the first sample that holds one."""
    for key, t in (("x", x), ("y", y)):
        if not t.is_floating_point() or not len(t):
            continue
        rows = t.reshape(len(t), -1)
        finite = torch.isfinite(rows)
        bad = (~finite).any(dim=1).nonzero()
        if len(bad):
            i = int(bad[0])
            value = rows[i][~finite[i]][0].item()
            raise _problem(key, f"{spec.path}: sample {i} of '{getattr(spec, key)}' holds {value} "
                           f"({len(bad)} samples hold NaN or infinity)",
                           "clean the data (drop or fill those samples) before training on it")


def csv_target(spec: DataSpec) -> str:
    """Which column of a CSV the targets come from, in words (said when data.target is unset)."""
    with open(spec.path, newline="") as f:
        first = next((r for r in csv.reader(f) if r), [])
    cols = _target_columns(spec, first if spec.header else None, max(len(first), 1))
    name = ", ".join(f"'{first[c]}' (column {c})" if spec.header and first else f"column {c}" for c in cols)
    return name + (" (the last; set data.target to pick another)" if spec.target is None else "")


def labels_of(splits: Splits) -> torch.Tensor | None:
    """Every target of in-memory data (train and validation); None for datasets only their
    batches reveal."""
    ys = [ds.y for ds in (splits.train, splits.val) if isinstance(ds, TensorPairs) and len(ds)]
    return torch.cat(ys) if ys else None


ON_DEVICE_SHARE = 0.25
"""In-memory data moves to the GPU when it takes at most this share of the GPU's free memory."""


def on_device(splits: Splits, device: torch.device, workers: int) -> tuple[Splits, int]:
    """SPLITS with in-memory data on DEVICE (a GPU), where it fits in ON_DEVICE_SHARE of
    its free memory and no loader workers are asked for: each batch is then gathered there,
    with no copy from the host per step. Returns the bytes moved (0: none)."""
    sets = [ds for ds in (splits.train, splits.val) if isinstance(ds, TensorPairs)]
    if device.type != "cuda" or workers or not sets:
        return splits, 0
    size = sum(ds.nbytes for ds in sets)
    if size > torch.cuda.mem_get_info(device)[0] * ON_DEVICE_SHARE:
        return splits, 0
    move = lambda ds: ds.to(device) if isinstance(ds, TensorPairs) else ds  # noqa: E731
    return Splits(move(splits.train), move(splits.val), splits.description), size


def resident(ds: Dataset | None, device: torch.device) -> bool:
    """Whether every batch of DS comes on DEVICE already (in-memory data that `on_device`
    moved there): the loop then moves none of them (a `.to()` of a tensor already there is
    no copy, but two calls a step, which a small model's step on a GPU shows)."""
    if not isinstance(ds, TensorPairs):
        return False
    found = ds.x.device
    return found.type == device.type and (device.index is None or found.index == device.index) \
        and ds.y.device == found


def float_targets(splits: Splits, shape: tuple[int, ...]) -> Splits:
    """In-memory 0/1 labels as float targets of SHAPE per sample (a loss such as
    BCEWithLogitsLoss takes them so), converted once rather than at every batch."""
    def convert(ds):
        if not isinstance(ds, TensorPairs):
            return ds
        return TensorPairs(ds.x, ds.y.to(torch.float32).reshape(len(ds.y), *shape))
    return Splits(convert(splits.train), convert(splits.val), splits.description)


def synthetic(spec: DataSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters (classification) or a noisy linear map (regression), fixed by seed."""
    g = seeded(seed, DATA)
    n, f = spec.samples, spec.features
    if spec.task == "classification":
        centers = torch.randn(spec.classes, f, generator=g)
        y = torch.randint(spec.classes, (n,), generator=g)
        return centers[y] + torch.randn(n, f, generator=g), y
    weight = torch.randn(f, spec.outputs, generator=g) / math.sqrt(f)
    x = torch.randn(n, f, generator=g)
    return x, x @ weight + 0.1 * torch.randn(n, spec.outputs, generator=g)


def _problem(key: str, message: str, fix: str) -> JobSpecError:
    return JobSpecError([Problem(("data", key), message, fix=fix)])


def read_csv(spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor]:
    with open(spec.path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    header = rows.pop(0) if spec.header and rows else None
    if not rows:
        raise _problem("path", f"{spec.path} has no data rows", "check the file, and data.header")
    width = len(rows[0])
    cols = _target_columns(spec, header, width)
    xs, ys = [], []
    for number, row in enumerate(rows, start=2 if header else 1):
        if len(row) != width:
            raise _problem("path", f"{spec.path} line {number}: {len(row)} columns, expected {width}",
                           "give every row the same number of columns")
        ys.append([row[c] for c in cols])
        try:
            values = [float(v) for i, v in enumerate(row) if i not in cols]
        except ValueError as e:
            raise _problem("path", f"{spec.path} line {number}: {e}",
                           "every column but the targets must be a number") from e
        xs.append(values)
        if not all(map(math.isfinite, values)) or any(row[c].strip().lower().lstrip("+-") in NON_FINITE for c in cols):
            _refuse_row(spec, number, row, header)
    if len(cols) == 1:
        return torch.tensor(xs, dtype=torch.float32), _labels([y for (y,) in ys], spec)
    return torch.tensor(xs, dtype=torch.float32), _label_columns(ys, spec)


NON_FINITE = ("nan", "inf", "infinity")  # how float() spells them, whatever the case and sign


def _refuse_row(spec: DataSpec, number: int, row: list[str], header: list[str] | None) -> None:
    """JobSpecError naming the first column of ROW (line NUMBER) that holds NaN or infinity."""
    for i, text in enumerate(row):
        try:
            finite = math.isfinite(float(text))
        except ValueError:
            continue  # a text label
        if not finite:
            column = f"'{header[i]}'" if header else f"{i}"
            raise _problem("path", f"{spec.path} line {number}, column {column}: {text.strip()} is not a finite "
                           "number", "clean the data (drop or fill that row) before training on it")


def _target_columns(spec: DataSpec, header: list[str] | None, width: int) -> list[int]:
    """The target columns: one, or several (data.target a list: multi-label, or several
    regression outputs)."""
    if not isinstance(spec.target, list):
        return [_target_column(spec, header, width)]
    cols = [_target_column(spec, header, width, t) for t in spec.target]
    if len(set(cols)) != len(cols):
        raise _problem("target", f"{spec.target} names a column twice", "name each target column once")
    return cols


def _label_columns(rows: list[list[str]], spec: DataSpec) -> torch.Tensor:
    try:
        return torch.tensor([[float(v) for v in row] for row in rows])
    except ValueError as e:
        raise _problem("target", f"several target columns must hold numbers (0/1 labels, or regression "
                       f"outputs): {e}", "pick numeric columns, or one text column as the class label") from e


def _target_column(spec: DataSpec, header: list[str] | None, width: int, target: str | int | None = None) -> int:
    target = (-1 if spec.target is None else spec.target) if target is None else target
    if isinstance(target, str):
        if header is None or target not in header:
            known = header or []
            raise _problem("target", f"no column named '{target}' in {spec.path}{names.suggest(target, known)}",
                           f"use one of: {', '.join(known)}" if known else "give a column index, or set header = true")
        return header.index(target)
    if not -width <= target < width:
        raise _problem("target", f"column {target} is out of range; {spec.path} has {width} columns",
                       f"use an index from 0 to {width - 1}, or -1 for the last")
    return target % width


def _labels(values: list[str], spec: DataSpec) -> torch.Tensor:
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        if spec.task == "regression":
            raise _problem("target", "the target column holds text, but task = 'regression'",
                           "pick a numeric target column, or task = 'classification'") from None
        classes = sorted(set(values))  # text labels: class i is the i-th label in sorted order
        return torch.tensor([classes.index(v) for v in values])
    return torch.tensor(numbers)


def read_arrays(spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.source == "npz":
        try:
            with np.load(spec.path, allow_pickle=False) as archive:
                found = {k: torch.from_numpy(archive[k]) for k in archive.files}
        except (ValueError, OSError) as e:
            raise _problem("path", f"cannot read {spec.path} as npz: {e}", "save it with numpy.savez") from e
    else:
        try:
            found = torch.load(spec.path, weights_only=True, map_location="cpu")
        except Exception as e:  # torch raises many kinds on bad files; all mean the same here
            raise _problem("path", f"cannot read {spec.path} with torch.load(weights_only=True): {e}",
                           "save a dict of tensors: torch.save({'x': x, 'y': y}, path)") from e
        if not isinstance(found, dict):
            raise _problem("path", f"{spec.path} holds {type(found).__name__}, not a dict of tensors",
                           "save a dict of tensors: torch.save({'x': x, 'y': y}, path)")
    for key in ("x", "y"):
        name = getattr(spec, key)
        if name not in found:
            raise _problem(key, f"{spec.path} has no '{name}'{names.suggest(name, found)}",
                           f"set data.{key} to one of: {', '.join(found)}")
    return torch.as_tensor(found[spec.x]), torch.as_tensor(found[spec.y])


def _shape_for_task(x: torch.Tensor, y: torch.Tensor, spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """CONTRACT §3: classification y is int64 of shape (n,), regression y float32 (n, outputs)."""
    if len(x) != len(y):
        raise _problem("path", f"x has {len(x)} samples but y has {len(y)}", "give x and y one row per sample")
    x = x.float()
    if spec.task == "regression":
        return x, (y.reshape(len(y), -1) if y.dim() < 2 else y).float()
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise _problem("task", "classification needs whole-number class labels, but y has fractions",
                       "set task = 'regression', or store class indices in y")
    # (n,) or (n, 1): one class label per sample; (n, k): k 0/1 labels (multi-label)
    y = (y.reshape(-1) if y.dim() < 2 or y.shape[1:].numel() == 1 else y.reshape(len(y), -1)).long()
    if len(y) and int(y.min()) < 0:
        raise _problem("task", "class labels must be 0 or more", "store class indices 0..classes-1 in y")
    return x, y


def split(whole: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    n = len(whole)
    n_val = int(round(n * val_fraction))
    if n_val == 0:
        return whole, None
    order = torch.randperm(n, generator=seeded(seed, SPLIT))
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
    if isinstance(whole, TensorPairs):
        return TensorPairs(whole.x[train_idx], whole.y[train_idx]), TensorPairs(whole.x[val_idx], whole.y[val_idx])
    return Subset(whole, train_idx.tolist()), Subset(whole, val_idx.tolist())


def _factory_splits(spec: DataSpec, seed: int, python_path: list[str]) -> Splits:
    try:
        factory = names.import_object(spec.source, python_path)
    except LookupError as e:
        raise _problem("source", str(e), names.IMPORT_PATH_HELP) from e
    try:
        with names.search_path(python_path):
            made = factory(**spec.kwargs)
    except Exception as e:  # user code
        raise _problem("source", f"{spec.source}(**kwargs) raised {type(e).__name__}: {e}",
                       f"check data.kwargs against {names.signature_text(factory, spec.source)}") from e
    if isinstance(made, tuple) and len(made) == 2:
        train, val = made
    elif isinstance(made, Dataset):
        train, val = split(made, spec.val_fraction, seed)
    else:
        raise _problem("source", f"{spec.source} returned {type(made).__name__}",
                       "return a torch Dataset, or a (train, val) pair of them")
    return Splits(train, val, f"{spec.source}: {len(train)} train / {len(val) if val else 0} val samples")


class EpochBatches(Sampler[torch.Tensor]):
    """The batches of one epoch, from batch START on, as index tensors: the order is a
    permutation that follows from (seed, epoch) alone, so any batch can come first."""

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int, shuffle: bool, start: int = 0,
                 part: tuple[int, int] = (0, 1), device: torch.device | None = None):
        self.size, self.batch_size, self.seed, self.epoch, self.shuffle = size, batch_size, seed, epoch, shuffle
        self.start, (self.rank, self.ranks), self.device = start, part, device

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        return torch.randperm(self.size, generator=seeded(self.seed, ORDER, self.epoch))

    def __iter__(self):
        # Tensors, not lists: TensorPairs gathers with them directly (no list->tensor per batch);
        # on the device of data kept there, moved once an epoch.
        rest = self.order()[self.start * self.batch_size:].to(self.device)
        batches = rest.split(self.batch_size) if len(rest) else ()
        if self.ranks > 1:  # each rank its slice of every global batch: the order is the same at any world size
            return (b.tensor_split(self.ranks)[self.rank] for b in batches)
        return iter(batches)

    def __len__(self) -> int:
        return max(0, math.ceil(self.size / self.batch_size) - self.start)


def batches_per_epoch(train: Dataset, batch_size: int) -> int:
    return math.ceil(len(train) / batch_size)


def train_loader(train: Dataset, spec: DataSpec, seed: int, epoch: int, start_batch: int = 0,
                 pin_memory: bool = False, part: tuple[int, int] = (0, 1)) -> Iterable:
    """The batches of EPOCH from batch START_BATCH on (PART: this rank's share of each, as
    (rank, ranks)). The explicit generator keeps the loader off the global RNG (it would
    otherwise draw the workers' base seed there)."""
    batches = EpochBatches(len(train), spec.batch_size, seed, epoch, spec.shuffle, start_batch, part, _home(train))
    return _loader(train, spec, batches, seeded(seed, WORKERS, epoch, *_rank_keys(part)), pin_memory)


def val_loader(val: Dataset, spec: DataSpec, seed: int, pin_memory: bool = False,
               part: tuple[int, int] = (0, 1)) -> Iterable:
    batches = EpochBatches(len(val), spec.batch_size, seed, 0, shuffle=False, part=part, device=_home(val))
    return _loader(val, spec, batches, seeded(seed, WORKERS, *_rank_keys(part)), pin_memory)


def _home(ds: Dataset) -> torch.device | None:
    """The device of data kept on a GPU (`on_device`), where its batches' indices go."""
    return ds.x.device if isinstance(ds, TensorPairs) and ds.x.is_cuda else None


def _rank_keys(part: tuple[int, int]) -> tuple[int, ...]:
    """Seed keys of a rank's loader workers: none alone (as before ranks existed)."""
    return part if part[1] > 1 else ()


def first_batch(ds: Dataset, spec: DataSpec):
    """The first batch in stored order, for dry runs: no workers, no global RNG drawn."""
    batches = EpochBatches(len(ds), spec.batch_size, 0, 0, shuffle=False)
    return next(iter(_loader(ds, spec, batches, seeded(0), False, workers=0)))


def _loader(ds: Dataset, spec: DataSpec, batches: EpochBatches, generator: torch.Generator, pin: bool,
            workers: int | None = None) -> Iterable:
    workers = spec.num_workers if workers is None else workers
    if isinstance(ds, TensorPairs) and workers == 0:
        # In-memory tensors in this process: a DataLoader would only wrap the same gathers
        # in ~16 us of bookkeeping per batch, 3% of a small MLP's step (bench/loop.py).
        return (ds.batch(index, pin) for index in batches)
    # Worker processes get plain lists: a tensor would travel through shared memory, which
    # costs more than it saves. User datasets get ints and the default collation.
    collate = keep_batch if isinstance(ds, TensorPairs) else None
    return DataLoader(ds, batch_sampler=_AsLists(batches), collate_fn=collate, num_workers=workers,
                      generator=generator, pin_memory=pin)


class _AsLists(Sampler[list[int]]):
    def __init__(self, batches: EpochBatches):
        self.batches = batches

    def __iter__(self):
        return (b.tolist() for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)
