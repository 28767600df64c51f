import pytest
import torch

from safecode_kernels.decoding.host_to_device import to_device


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.float32, torch.bool])
def test_values_arrive_exactly(dtype):
    values = [1, 0, 1, 1] if dtype == torch.bool else [3, -1, 0, 7]
    out = to_device(values, dtype, "cpu")
    assert out.dtype == dtype and out.device.type == "cpu"
    assert out.tolist() == [bool(v) for v in values] if dtype == torch.bool else out.tolist() == values


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory)")
def test_cuda_copy_is_queued_without_a_sync():
    torch.cuda.set_sync_debug_mode("error")  # a synchronizing copy raises
    try:
        out = to_device(list(range(1000)), torch.int64, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device.type == "cuda" and out.cpu().tolist() == list(range(1000))
