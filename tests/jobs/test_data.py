import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from traind.jobs import data
from traind.jobs.errors import JobSpecError
from traind.jobs.spec import DataSpec


def splits(spec_of, data_section, seed=0, extra=""):
    spec = spec_of(f'seed = {seed}\n{extra}[model]\nlayers = [["Linear", 2, 2]]\n[data]\n{data_section}\n')
    return data.load_splits(spec.data, spec.seed, spec.python_path)


def tensors(ds):
    return ds.x, ds.y


def test_synthetic_classification_is_fixed_by_seed(spec_of):
    a = splits(spec_of, "samples = 100\nfeatures = 5\nclasses = 3")
    b = splits(spec_of, "samples = 100\nfeatures = 5\nclasses = 3")
    c = splits(spec_of, "samples = 100\nfeatures = 5\nclasses = 3", seed=1)
    x, y = tensors(a.train)
    assert x.shape == (80, 5) and x.dtype == torch.float32
    assert y.shape == (80,) and y.dtype == torch.int64 and set(y.tolist()) <= {0, 1, 2}
    assert torch.equal(x, b.train.x) and torch.equal(a.val.y, b.val.y)
    assert not torch.equal(x, c.train.x)


def test_synthetic_regression_shapes(spec_of):
    s = splits(spec_of, "task = 'regression'\nsamples = 50\nfeatures = 4\noutputs = 3\nval_fraction = 0.0")
    x, y = tensors(s.train)
    assert x.shape == (50, 4) and y.shape == (50, 3) and y.dtype == torch.float32
    assert s.val is None


def test_split_is_disjoint_complete_and_fixed_by_seed():
    whole = data.TensorPairs(torch.arange(100.0).unsqueeze(1), torch.arange(100))
    train, val = data.split(whole, 0.25, seed=3)
    assert len(val) == 25 and len(train) == 75
    assert sorted(train.y.tolist() + val.y.tolist()) == list(range(100))
    assert torch.equal(data.split(whole, 0.25, seed=3)[1].y, val.y)
    assert not torch.equal(data.split(whole, 0.25, seed=4)[1].y, val.y)


def test_csv_with_header_target_by_name_and_text_labels(spec_of, tmp_path):
    (tmp_path / "d.csv").write_text("a,label,b\n1,cat,2\n3,dog,4\n5,cat,6\n7,bird,8\n")
    s = splits(spec_of, "source = 'csv'\npath = 'd.csv'\ntarget = 'label'\nval_fraction = 0.0")
    x, y = tensors(s.train)
    assert x.tolist() == [[1, 2], [3, 4], [5, 6], [7, 8]]
    assert y.tolist() == [1, 2, 1, 0]  # bird, cat, dog in sorted order


def test_csv_without_header_target_by_index(spec_of, tmp_path):
    (tmp_path / "d.csv").write_text("0.5,1,0.25\n1.5,0,0.75\n")
    s = splits(spec_of, "source = 'csv'\npath = 'd.csv'\nheader = false\ntarget = 1\nval_fraction = 0.0")
    assert s.train.x.tolist() == [[0.5, 0.25], [1.5, 0.75]] and s.train.y.tolist() == [1, 0]
    r = splits(spec_of, "source = 'csv'\npath = 'd.csv'\nheader = false\ntask = 'regression'\nval_fraction = 0.0")
    assert r.train.y.tolist() == [[0.25], [0.75]]


@pytest.mark.parametrize("content, section, words", [
    ("a,b\n1,x\n", "target = 'c'", "no column named 'c'"),
    ("a,b\n1,0\nq,1\n", "", "line 3: could not convert string to float: 'q'"),
    ("a,b\n1,0\n1,2,3\n", "", "line 3: 3 columns, expected 2"),
    ("a,b\n", "", "has no data rows"),
    ("a,b\n1,0\n", "target = 5", "column 5 is out of range"),
    ("a,b\n1,0.5\n", "", "whole-number class labels"),
])
def test_csv_errors_name_the_problem(spec_of, tmp_path, content, section, words):
    (tmp_path / "d.csv").write_text(content)
    with pytest.raises(JobSpecError) as caught:
        splits(spec_of, f"source = 'csv'\npath = 'd.csv'\n{section}")
    assert words in caught.value.render()


def test_npz_source(spec_of, tmp_path):
    np.savez(tmp_path / "d.npz", inputs=np.ones((10, 3), np.float64), labels=np.arange(10) % 2)
    s = splits(spec_of, "source = 'npz'\npath = 'd.npz'\nx = 'inputs'\ny = 'labels'\nval_fraction = 0.0")
    assert s.train.x.dtype == torch.float32 and s.train.y.tolist() == [0, 1] * 5
    with pytest.raises(JobSpecError, match="has no 'label'; did you mean 'labels'"):
        splits(spec_of, "source = 'npz'\npath = 'd.npz'\nx = 'inputs'\ny = 'label'")


def test_pt_source_loads_tensors_only(spec_of, tmp_path):
    torch.save({"x": torch.randn(8, 2), "y": torch.arange(8) % 2}, tmp_path / "d.pt")
    s = splits(spec_of, "source = 'pt'\npath = 'd.pt'\nval_fraction = 0.25")
    assert len(s.train) == 6 and len(s.val) == 2


class Payload:
    """Not a tensor: weights_only=True must refuse to unpickle it."""

    ran = False

    def __reduce__(self):
        return (Payload.mark, ())

    @staticmethod
    def mark():
        Payload.ran = True
        return {}


def test_pt_source_refuses_pickled_objects(spec_of, tmp_path):
    torch.save({"x": torch.zeros(2, 2), "y": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(JobSpecError, match="weights_only=True"):
        splits(spec_of, "source = 'pt'\npath = 'evil.pt'")
    assert not Payload.ran


def test_factory_source_returning_one_dataset_or_a_pair(spec_of, tmp_path):
    (tmp_path / "sets.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def one(n=10):\n    return TensorDataset(torch.randn(n, 2), torch.arange(n) % 2)\n"
        "def pair():\n    return one(6), one(4)\n")
    s = splits(spec_of, "source = 'sets:one'\nkwargs = { n = 20 }", extra='python_path = ["."]\n')
    assert len(s.train) == 16 and len(s.val) == 4
    p = splits(spec_of, "source = 'sets:pair'", extra='python_path = ["."]\n')
    assert len(p.train) == 6 and len(p.val) == 4
    batch = data.first_batch(s.train, DataSpec(batch_size=5))
    assert batch[0].shape == (5, 2)


def batches(loader):
    return [y.tolist() for _, y in loader]


def labelled(n):
    return data.TensorPairs(torch.arange(float(n)).unsqueeze(1), torch.arange(n))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_started_at_batch_k_sees_the_rest_of_the_epoch(workers):
    ds, spec = labelled(103), DataSpec(batch_size=10, num_workers=workers)
    full = batches(data.train_loader(ds, spec, seed=7, epoch=2))
    assert len(full) == 11 and sorted(sum(full, [])) == list(range(103))
    for k in (0, 1, 5, 10, 11):
        assert batches(data.train_loader(ds, spec, seed=7, epoch=2, start_batch=k)) == full[k:]


def test_order_follows_seed_and_epoch():
    ds, spec = labelled(50), DataSpec(batch_size=50)
    e0, e1 = (batches(data.train_loader(ds, spec, seed=1, epoch=e)) for e in (0, 1))
    assert e0 != e1
    assert batches(data.train_loader(ds, spec, seed=1, epoch=0)) == e0
    assert batches(data.train_loader(ds, spec, seed=2, epoch=0)) != e0
    assert batches(data.train_loader(ds, DataSpec(batch_size=50, shuffle=False), seed=1, epoch=3)) == [list(range(50))]


def test_loaders_do_not_draw_from_the_global_rng():
    ds = labelled(40)
    plain = TensorDataset(torch.randn(40, 1), torch.arange(40))
    state = torch.get_rng_state()
    for d in (ds, plain):
        for _ in data.train_loader(d, DataSpec(batch_size=8, num_workers=0), seed=0, epoch=1, start_batch=2):
            pass
        for _ in data.val_loader(d, DataSpec(batch_size=8), seed=0):
            pass
        data.first_batch(d, DataSpec(batch_size=8))
    assert torch.equal(state, torch.get_rng_state())


def test_tensor_pairs_batches_match_default_collation():
    ds = labelled(30)
    fast = list(data.train_loader(ds, DataSpec(batch_size=7), seed=0, epoch=0))
    slow = list(data.train_loader(TensorDataset(ds.x, ds.y), DataSpec(batch_size=7), seed=0, epoch=0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(fast, slow))


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity", "1e999"])
def test_a_csv_value_that_is_not_finite_is_refused_with_its_line_and_column(spec_of, tmp_path, value):
    rows = [f"{i},{i % 2}" for i in range(30)]
    rows[17] = f"{value},1"
    (tmp_path / "d.csv").write_text("a,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(JobSpecError) as caught:
        splits(spec_of, "source = 'csv'\npath = 'd.csv'")
    p = caught.value.problems[0]
    assert p.path == ("data", "path") and "line 19, column 'a'" in p.message and "not a finite number" in p.message


def test_a_regression_target_that_is_not_finite_is_refused(spec_of, tmp_path):
    (tmp_path / "d.csv").write_text("a,t\n" + "".join(f"{i},{i}\n" for i in range(20)) + "3,nan\n")
    with pytest.raises(JobSpecError, match="line 22, column 't': nan is not a finite number"):
        splits(spec_of, "source = 'csv'\npath = 'd.csv'\ntask = 'regression'")


def test_arrays_that_hold_nan_are_refused_naming_the_first_sample(spec_of, tmp_path):
    x = torch.randn(50, 3)
    x[31, 2] = float("nan")
    x[40, 0] = float("inf")
    torch.save({"x": x, "y": torch.zeros(50, dtype=torch.long)}, tmp_path / "d.pt")
    with pytest.raises(JobSpecError, match=r"sample 31 of 'x' holds nan \(2 samples hold NaN or infinity\)"):
        splits(spec_of, "source = 'pt'\npath = 'd.pt'")


def test_the_csv_target_column_is_named_when_it_was_not_given(spec_of, tmp_path):
    (tmp_path / "d.csv").write_text("a,b,kind\n" + "".join(f"{i},{i},{'xy'[i % 2]}\n" for i in range(20)))
    found = splits(spec_of, "source = 'csv'\npath = 'd.csv'")
    assert "target 'kind' (column 2) (the last; set data.target to pick another)" in found.description


def test_data_is_resident_on_a_device_only_where_every_tensor_of_it_is_there():
    """The loop moves no batch of in-memory data that `on_device` put on its device (the
    meta device stands for a GPU here), and moves everything else."""
    meta, cpu = torch.device("meta"), torch.device("cpu")
    there = data.TensorPairs(torch.empty(8, 3, device="meta"), torch.empty(8, device="meta"))
    assert data.resident(there, meta) and not data.resident(there, cpu)
    assert not data.resident(data.TensorPairs(torch.zeros(8, 3), torch.zeros(8)), meta)
    assert not data.resident(data.TensorPairs(torch.empty(8, 3, device="meta"), torch.zeros(8)), meta)
    assert not data.resident(TensorDataset(torch.empty(8, 3, device="meta")), meta)  # not traind's in-memory pairs
    assert not data.resident(None, meta)
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)

    class Pretend:  # a tensor's device as a GPU's would read (no GPU here)
        def __init__(self, device):
            self.device = device

    pair = data.TensorPairs.__new__(data.TensorPairs)
    pair.x, pair.y = Pretend(cuda0), Pretend(cuda0)
    assert data.resident(pair, torch.device("cuda")) and data.resident(pair, cuda0)
    assert not data.resident(pair, cuda1)
