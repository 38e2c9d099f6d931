"""On a CUDA device (`pytest -m gpu`; scripts/gpu-check runs them on a lent GPU machine):
try_gpu() picks the GPU, saves copy through pinned memory and hold the CUDA RNG, in-memory
data lives on the GPU, the steps between two looks at the losses never wait for the device,
fp16 keeps its GradScaler in the saves, a compiled model saves plain names. The kill -9
tests of jobs on CUDA (deterministic, bf16, fp16, compile) are in tests/daemon/test_kill.py,
marked gpu as these are."""

import json
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import MLP
from tests.jobs.test_checkpoint import Run, equal
from tests.jobs.test_switches import BOX, job_at
from traind.jobs import data, devices
from traind.jobs.build import build_job
from traind.jobs.metrics import Recorder
from traind.jobs.train import Trainer
from traind.store.saves import list_saves

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

ON_GPU = MLP.replace("seed = 0", "seed = 0\ndevice = 'cuda'\ndeterministic = true")


def test_try_gpu_picks_the_gpu(spec_of):
    assert devices.resolve_device("auto") == torch.device("cuda:0")
    job = build_job(spec_of(MLP), "t")
    assert job.device.type == "cuda" and next(job.model.parameters()).is_cuda


def test_a_save_copies_through_pinned_memory_and_holds_the_cuda_rng(tmp_path):
    run = Run(job_at(tmp_path, ON_GPU), tmp_path / "run")
    assert run.go()
    buffers = run.ckpt.snapshot._buffers
    assert buffers and all(b.is_pinned() for b in buffers.values())
    save = list_saves(tmp_path / "run" / "saves")[0][-1]
    doc = json.loads((save.path / "state.json").read_text())
    assert len(doc["rng"]["cuda"]) == torch.cuda.device_count()
    stalls = [json.loads(line)["stall_s"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"kind": "save"' in line]
    assert stalls


def test_stopped_and_resumed_on_cuda_ends_bitwise_equal(tmp_path):
    """In one process, fresh builds for each run (the kill -9 form is in test_kill)."""
    whole = Run(job_at(tmp_path, ON_GPU), tmp_path / "whole")
    assert whole.go()
    for stop_at in (3, 8, 13):
        assert not Run(job_at(tmp_path, ON_GPU), tmp_path / "run", stop_at).go()
    last = Run(job_at(tmp_path, ON_GPU), tmp_path / "run")
    assert last.go()
    assert equal(last.weights(), whole.weights())


def test_in_memory_data_lives_on_the_gpu_and_batches_are_gathered_there(spec_of):
    t = Trainer(build_job(spec_of(MLP), "t"), Recorder())
    assert t.job.splits.train.x.is_cuda and t.job.splits.val.y.is_cuda
    x, y = next(iter(data.train_loader(t.job.splits.train, t.spec.data, 0, 0)))
    assert x.is_cuda and y.is_cuda
    workers = Trainer(build_job(spec_of(MLP.replace("batch_size = 32", "batch_size = 32\nnum_workers = 1")), "t"),
                      Recorder())
    assert not workers.job.splits.train.x.is_cuda  # workers: host data, pinned batches
    assert workers.pin


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_steps_between_two_looks_never_wait_for_the_gpu(spec_of, precision):
    """torch's sync debug mode warns at every host-device synchronisation: none in the
    steps themselves; the look after them is the one. (fp16: torch's GradScaler checks for
    overflow on the host before each step, unless the optimizer is fused.)"""
    text = MLP.replace("epochs = 3", f"epochs = 3\nprecision = '{precision}'\nlog_every_steps = 1000")
    if precision == "fp16":
        text += "[optimizer]\nfused = true\n"
    t = Trainer(build_job(spec_of(text), "t"), Recorder())
    batches = list(data.train_loader(t.job.splits.train, t.spec.data, 0, 0))
    t.job.model.train()
    t.step([(0, *batches[0])])  # the first step allocates (the optimizer's state, the scaler's)
    t.look()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for i, (x, y) in enumerate(batches[1:6], start=1):
                t.step([(i, x, y)])
        synced = [str(w.message) for w in seen if "synchroniz" in str(w.message).lower()]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert synced == [], synced[:3]
    assert t.look() is not None


def test_fp16_keeps_its_grad_scaler_in_every_save(tmp_path):
    text = BOX.replace('precision = "bf16"', 'precision = "fp16"').replace("epochs = 12", "epochs = 2")
    run = Run(job_at(tmp_path, text), tmp_path / "run")
    assert run.go()
    for save in list_saves(tmp_path / "run" / "saves")[0]:
        scaler = json.loads((save.path / "state.json").read_text())["scaler"]
        assert scaler["scale"] > 0 and "_growth_tracker" in scaler


def test_a_compiled_model_saves_plain_names_that_load_into_the_plain_module(tmp_path):
    """In a process of its own (`traind run`): torch.compile's worker threads live as long as their process."""
    assert compiled_run(tmp_path, ON_GPU.replace("epochs = 3", "epochs = 2\ncompile = true"))


def compiled_run(tmp_path, text):
    """Run TEXT (compile = true) with `traind run`; its final save's weights have the plain
    names and load into the plain module. True when so."""
    path = tmp_path / "compiled.toml"
    path.write_text(text)
    done = subprocess.run([sys.executable, "-m", "traind.daemon.cli", "run", str(path), "--dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = load_file(list_saves(tmp_path / "run" / "saves")[0][-1].path / "model.safetensors")
    assert saved and not any("_orig_mod" in k for k in saved)
    plain = build_job(job_at(tmp_path, text.replace("compile = true", "")).spec, "plain").model
    plain.load_state_dict(saved)
    return equal({k: v.cpu() for k, v in plain.state_dict().items()}, saved)
