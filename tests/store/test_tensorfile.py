import io

import pytest
import torch
from safetensors.torch import load, load_file, save

from traind.store import tensorfile


def as_bytes(tensors, metadata=None):
    out = io.BytesIO()
    size = tensorfile.write(tensors, metadata, lambda view: out.write(view))
    assert size == len(out.getvalue()) == tensorfile.file_size(tensors, metadata)
    return out.getvalue()


def sample():
    g = torch.Generator().manual_seed(0)
    return {
        "weight": torch.randn(3, 4, generator=g),
        "bias": torch.zeros(4, dtype=torch.float64),
        "half": torch.randn(5, generator=g).half(),
        "brain": torch.randn(2, 3, generator=g).bfloat16(),
        "steps": torch.arange(7, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "bytes": torch.arange(10, dtype=torch.uint8),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "i8": torch.tensor([-1, 2], dtype=torch.int8),
        "i16": torch.tensor([300], dtype=torch.int16),
        "i32": torch.tensor([70000], dtype=torch.int32),
        "e4": torch.tensor([0.5]).to(torch.float8_e4m3fn),
        "e5": torch.tensor([0.25]).to(torch.float8_e5m2),
    }


def test_output_is_byte_for_byte_what_safetensors_writes():
    tensors = sample()
    assert as_bytes(tensors, {"job": "mlp"}) == save(tensors, metadata={"job": "mlp"})
    assert as_bytes(tensors) == save(tensors)


def test_metadata_reads_back_and_is_written_in_a_stable_order(tmp_path):
    from safetensors import safe_open

    meta = {"step": "240", "job": "mlp", "metrics": '{"val_loss": 0.5}'}
    data = as_bytes({"w": torch.ones(2)}, meta)
    assert data == as_bytes({"w": torch.ones(2)}, dict(reversed(meta.items())))
    path = tmp_path / "meta.safetensors"
    path.write_bytes(data)
    with safe_open(path, "pt") as f:
        assert f.metadata() == meta


def test_pinned_bytes_of_a_tiny_file():
    """The format on disk, pinned: a change here breaks every save already written."""
    data = as_bytes({"b": torch.tensor([1.0, -2.0]), "a": torch.tensor([7], dtype=torch.int64)}, {"k": "v"})
    assert data == (
        b"\x88\x00\x00\x00\x00\x00\x00\x00"
        b'{"__metadata__":{"k":"v"},"a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},'
        b'"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}   '
        b"\x07\x00\x00\x00\x00\x00\x00\x00" b"\x00\x00\x80\x3f" b"\x00\x00\x00\xc0")


def test_the_library_reads_what_it_wrote(tmp_path):
    tensors = sample()
    path = tmp_path / "t.safetensors"
    with open(path, "wb") as f:
        tensorfile.write(tensors, {"m": "1"}, f.write)
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype
        assert torch.equal(back[k].view(torch.uint8), t.view(torch.uint8)) if t.dtype in (
            torch.float8_e4m3fn, torch.float8_e5m2) else torch.equal(back[k], t)


def test_non_contiguous_tensors_are_written_in_logical_order():
    t = torch.arange(12.0).reshape(3, 4).t()
    assert not t.is_contiguous()
    assert torch.equal(load(as_bytes({"t": t}))["t"], t)


def test_unsupported_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="tensor 'c' has dtype torch.complex64"):
        as_bytes({"c": torch.zeros(2, dtype=torch.complex64)})
