"""On CUDA the ops never synchronise with the host when ``check=False`` (one sync per call costs
30-80 us and caps the bandwidth of small shapes). Skipped without a GPU."""

import pytest
import torch

import heal_kernels
from heal_kernels.ops.entropy import entropy_and_logprobs, token_entropy


def _calls():
    dev = "cuda"
    z = torch.randn(64, 1000, device=dev, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1000, (64,), device=dev)
    lengths = torch.randint(1, 300, (48,))
    cu = torch.zeros(49, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    values = torch.rand(int(cu[-1])).to(dev)
    cu = cu.to(dev)
    groups = (torch.rand(48) < 0.3).long().to(dev)

    def run():
        ent = token_entropy(z, 0.7)
        ent.sum().backward()
        ent, lp = entropy_and_logprobs(z, labels, 0.7)
        (ent - lp).sum().backward()
        return heal_kernels.grouped_max_similarity(values, cu, groups, 2, check=False)

    return run


@pytest.mark.cuda
def test_no_host_sync_with_check_false():
    run = _calls()
    run()  # compile the kernels and warm the caches outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (48, 2)


@pytest.mark.cuda
def test_check_true_still_rejects_bad_labels_on_cuda():
    z = torch.randn(4, 10, device="cuda")
    with pytest.raises(ValueError, match="labels must lie"):
        entropy_and_logprobs(z, torch.tensor([0, 10, 1, 2], device="cuda"), check=True)
    lp = entropy_and_logprobs(z, torch.tensor([0, 10, 1, 2], device="cuda"))[1]  # unchecked: NaN, no error
    assert torch.isnan(lp[1]) and torch.isfinite(lp[[0, 2, 3]]).all()
