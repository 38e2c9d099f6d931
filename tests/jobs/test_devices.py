import pytest
import torch

from traind.jobs import devices
from traind.jobs.errors import JobSpecError


@pytest.fixture
def gpus(monkeypatch):
    """Pretend the machine has N GPUs (the functions only count them)."""

    def have(n):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return have


def test_without_gpus_everything_is_the_cpu(gpus):
    gpus(0)
    assert devices.try_gpu() == torch.device("cpu")
    assert devices.try_all_gpus() == [torch.device("cpu")]
    assert devices.resolve_device("auto") == torch.device("cpu")


def test_with_gpus(gpus):
    gpus(2)
    assert devices.try_gpu() == torch.device("cuda:0")
    assert devices.try_gpu(1) == torch.device("cuda:1")
    assert devices.try_gpu(2) == torch.device("cpu")
    assert devices.try_all_gpus() == [torch.device("cuda:0"), torch.device("cuda:1")]
    assert devices.resolve_device("cuda:1") == torch.device("cuda:1")
    assert devices.resolve_device("cuda") == torch.device("cuda:0")
    assert devices.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("count, found", [(0, "found no GPU"), (2, "found cuda:0, cuda:1")])
def test_missing_cuda_device_names_the_devices_found(gpus, count, found):
    gpus(count)
    with pytest.raises(JobSpecError) as caught:
        devices.resolve_device("cuda:3")
    p = caught.value.problems[0]
    assert p.path == ("device",) and "device 'cuda:3' does not exist here" in p.message and found in p.message


def test_a_job_placed_on_gpu_5_sees_it_as_its_first(gpus, monkeypatch):
    gpus(1)  # CUDA_VISIBLE_DEVICES=5: the worker sees one GPU
    monkeypatch.setenv(devices.PLACED, "5")
    assert devices.resolve_device("cuda:5") == torch.device("cuda:0")
    with pytest.raises(JobSpecError, match="placed this job on GPU 5"):
        devices.resolve_device("cuda:2")


def test_each_rank_takes_its_own_gpu_and_more_ranks_than_gpus_are_refused_with_the_count(gpus):
    gpus(2)
    assert [devices.rank_device("auto", r) for r in (0, 1)] == [torch.device("cuda:0"), torch.device("cuda:1")]
    assert devices.rank_device("cpu", 1) == torch.device("cpu")
    with pytest.raises(JobSpecError) as caught:
        devices.check_ranks("auto", 4)
    p = caught.value.problems[0]
    assert p.path == ("distributed", "processes") and "this machine has 2: cuda:0, cuda:1" in p.message
    with pytest.raises(JobSpecError, match="names one GPU"):
        devices.check_ranks("cuda:1", 2)
    devices.check_ranks("cpu", 4)  # CPU processes: as many as asked
    gpus(0)
    devices.check_ranks("auto", 4)
    assert devices.rank_device("auto", 3) == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_job_trains_on_the_gpu_try_gpu_picks(spec_of):
    from tests.conftest import MLP
    from traind.jobs.build import build_job
    from traind.jobs.metrics import Recorder
    from traind.jobs.train import Trainer

    t = Trainer(build_job(spec_of(MLP), "gpu"), Recorder())
    assert t.job.device == devices.try_gpu()
    assert all(p.device == t.job.device for p in t.job.model.parameters())
    assert t.fit()
