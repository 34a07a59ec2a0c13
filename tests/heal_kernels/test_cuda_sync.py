"""On CUDA the ops never synchronise with the host when ``check=False`` (one sync per call costs
30-80 us and caps the bandwidth of small shapes), and the EDA reward / step synchronise exactly
once. Skipped without a GPU; tests/heal_kernels/test_no_host_sync.py proves the same on a CPU
machine by running the CUDA path's logic through the Triton interpreter.

Syncs are counted with ``torch.cuda.set_sync_debug_mode("warn")``: every synchronising CUDA call
(``.item()``, ``nonzero``, a blocking copy either way, including host-to-device from pageable
memory) issues one warning."""

import contextlib
import warnings

import pytest
import torch

import heal_kernels
from heal_kernels.ops.entropy import entropy_and_logprobs, token_entropy

SYNC_WARNING = "called a synchronizing CUDA operation"


@contextlib.contextmanager
def count_syncs():
    """Yield a list that holds one entry per CUDA host synchronisation in the block."""
    torch.cuda.synchronize()
    found = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found.extend(str(w.message) for w in caught if SYNC_WARNING in str(w.message))


def _calls():
    dev = "cuda"
    z = torch.randn(64, 1000, device=dev, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1000, (64,), device=dev)
    h = torch.randn(64, 32, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1000, 32, device=dev, dtype=torch.bfloat16, requires_grad=True)
    lengths = torch.randint(1, 300, (48,))
    cu = torch.zeros(49, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    values = torch.rand(int(cu[-1])).to(dev)
    cu = cu.to(dev)
    groups = (torch.rand(48) < 0.3).long().to(dev)
    prompt_ids = [i // 4 for i in range(48)]  # a host list: copied from pinned memory

    def run():
        ent = token_entropy(z, 0.7)
        ent.sum().backward()
        ent = token_entropy(z, torch.tensor(0.7))  # a host (CPU) temperature tensor: read without a sync
        ent, lp = entropy_and_logprobs(z, labels, 0.7)
        (ent - lp).sum().backward()
        ent, lp = heal_kernels.linear_entropy_and_logprobs(h, w, labels, 0.7, chunk_tokens=32, chunk_vocab=256)
        (ent + lp).sum().backward()
        heal_kernels.pairwise_similarity(values, cu, check=False)
        return heal_kernels.grouped_max_similarity(values, cu, groups, 2, prompt_ids=prompt_ids, check=False)

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
def test_a_cuda_temperature_tensor_is_not_read_back():
    """The kernels read a CUDA temperature tensor from device memory: no sync, forward and backward."""
    z = torch.randn(8, 100, device="cuda", requires_grad=True)
    t = torch.tensor(0.7, device="cuda")  # made outside: building it is a (pageable) copy to the device
    token_entropy(z, t).sum().backward()
    with count_syncs() as syncs:
        token_entropy(z, t).sum().backward()
    assert len(syncs) == 0, syncs
    assert torch.equal(token_entropy(z, t), token_entropy(z, 0.7))


def _eda_batch(bsz=40, width=256):
    ent = torch.rand(bsz, width, device="cuda") * 2
    lens = torch.randint(0, width + 1, (bsz,), device="cuda")
    mask = (torch.arange(width, device="cuda").unsqueeze(0) < lens.unsqueeze(1)).long()
    sources = ["gen" if i % 3 == 0 else "math" for i in range(bsz)]
    uids = [f"u{i // 4}" for i in range(bsz)]
    return ent, mask, sources, uids


@pytest.mark.cuda
def test_eda_step_and_eda_reward_sync_once():
    from heal.dynamics import pack_padded
    from heal.reward import EDAConfig, eda_reward, eda_step

    ent, mask, sources, uids = _eda_batch()
    cfg = EDAConfig(general_sources=("gen",), min_length=10, exclude_same_prompt=True)
    eda_step(ent, mask, sources, uids, cfg)  # warm up
    with count_syncs() as syncs:
        result, metrics = eda_step(ent, mask, sources, uids, cfg)
    assert len(syncs) == 1, syncs
    # the exact-length path (a custom grouped_max packs to the exact length first): the same results
    exact, exact_metrics = eda_step(ent, mask, sources, uids, cfg, grouped_max=heal_kernels.grouped_max_similarity)
    for a, b in zip(result, exact):
        assert torch.equal(a, b)
    for k in metrics:
        if k == "eda/time_s":
            continue
        if k.startswith("eda/entropy_mean"):
            # float64 prefix sums: CUDA's cumsum (cub's scan) is not bitwise run-to-run deterministic
            assert metrics[k] == pytest.approx(exact_metrics[k], rel=1e-12, nan_ok=True), k
        else:
            a, b = metrics[k], exact_metrics[k]
            assert a == b or (a != a and b != b), k  # equal, or both NaN

    values, cu = pack_padded(ent, mask)
    is_general = torch.tensor([s == "gen" for s in sources], device="cuda")
    eda_reward(values, cu, is_general)
    with count_syncs() as syncs:
        eda_reward(values, cu, is_general)
    assert len(syncs) == 1, syncs


@pytest.mark.cuda
def test_check_true_still_rejects_bad_labels_on_cuda():
    z = torch.randn(4, 10, device="cuda")
    with pytest.raises(ValueError, match="labels must lie"):
        entropy_and_logprobs(z, torch.tensor([0, 10, 1, 2], device="cuda"), check=True)
    lp = entropy_and_logprobs(z, torch.tensor([0, 10, 1, 2], device="cuda"))[1]  # unchecked: NaN, no error
    assert torch.isnan(lp[1]) and torch.isfinite(lp[[0, 2, 3]]).all()
    h, w = torch.randn(4, 8, device="cuda"), torch.randn(10, 8, device="cuda")
    with pytest.raises(ValueError, match="labels must lie"):
        heal_kernels.linear_entropy_and_logprobs(h, w, torch.tensor([0, 10, 1, 2], device="cuda"), check=True)
    lp = heal_kernels.linear_entropy_and_logprobs(h, w, torch.tensor([0, 10, 1, -1], device="cuda"))[1]
    assert torch.isnan(lp[[1, 3]]).all() and torch.isfinite(lp[[0, 2]]).all()
