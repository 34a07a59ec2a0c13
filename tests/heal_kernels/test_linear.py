"""heal_kernels.linear_entropy_and_logprobs / linear_token_entropy against the float64 reference.

Each case runs on every backend present: the CPU path (C++ block kernels of ``csrc/linear.cpp``),
the chunked-torch kernels, the Triton kernels under the Triton interpreter on CPU tensors (small
shapes) and on CUDA when there is a GPU. Values and gradients (w.r.t. hidden, weight and bias, for
any mix of upstream gradients) are compared with autograd of ``reference.linear_entropy_and_logprobs``
in float64; 16-bit inputs are compared with the reference on the logits rounded to their dtype
(what ``hidden @ weight.T`` in that dtype holds). Memory: the tensors the op saves for the backward
are O(N) beyond its inputs, and no tensor created in forward + backward is of size ``N x V``.
"""

import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import heal_kernels
from heal_kernels import reference
from heal_kernels.ops.linear import linear_entropy_and_logprobs, linear_token_entropy

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

TARGETS = [
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(("cpu", "torch"), id="torch"),
    pytest.param(
        ("cpu", "triton"),
        id="triton-interp",
        marks=pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (set when there is no GPU)"),
    ),
    pytest.param(("cuda", "triton"), id="cuda", marks=pytest.mark.cuda),
]
VALUE_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 1e-3}
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture(params=TARGETS)
def target(request, monkeypatch):
    device, backend = request.param
    monkeypatch.setenv("HEAL_KERNELS_BACKEND", backend)
    return torch.device(device), backend


def make_inputs(n, d, v, dtype, device, bias=False, masked_every=0, scale=0.5):
    h = torch.randn(n, d, device=device).to(dtype)
    w = (torch.randn(v, d, device=device) * scale).to(dtype)
    b = None
    if bias:
        b = torch.randn(v, device=device).to(dtype)
        if masked_every:
            b[::masked_every] = -torch.inf
    labels = torch.randint(0, v, (n,), device=device)
    if bias and masked_every:
        labels = torch.where(labels % masked_every == 0, (labels + 1) % v, labels)  # label on a live token
    return h, w, b, labels


def reference_grads(h, w, b, labels, temperature, g_e, g_lp, dtype):
    """float64 outputs and gradients; for 16-bit inputs the logits are rounded to ``dtype`` first."""
    hd = h.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    bd = None if b is None else b.detach().double().requires_grad_()
    z = hd @ wd.T
    if bd is not None:
        z = z + bd
    if dtype != torch.float32:
        z = z + (z.detach().to(dtype).double() - z.detach())  # round the values, keep the gradient
    e, lp = reference.entropy_and_logprobs(z, labels, temperature)
    loss = 0
    if g_e is not None:
        loss = loss + (e * g_e.double()).sum()
    if g_lp is not None:
        loss = loss + (lp * g_lp.double()).sum()
    loss.backward()
    return e, lp, hd.grad, wd.grad, (None if bd is None else bd.grad)


def assert_close(got, ref, tol, what):
    got, ref = got.detach().cpu().double(), ref.detach().cpu().double()
    assert got.shape == ref.shape, f"{what}: {tuple(got.shape)} vs {tuple(ref.shape)}"
    both_inf = torch.isinf(got) & torch.isinf(ref) & (got.sign() == ref.sign())
    err = torch.where(both_inf, 0.0, (got - ref).abs())
    assert bool(torch.isfinite(err).all()), f"{what}: non-finite mismatch"
    assert err.max().item() <= tol * max(1.0, ref.abs().max().item()), f"{what}: max error {err.max().item():.3g}"


def assert_grad_close(got, ref, rtol, what):
    got, ref = got.detach().cpu().double(), ref.detach().cpu().double()
    assert got.shape == ref.shape
    scale = max(ref.abs().max().item(), 1e-3)  # a vocabulary of 1 has an exactly-zero gradient
    err = (got - ref).abs().max().item() / scale
    assert err <= rtol, f"{what}: relative gradient error {err:.3g}"


def run_case(device, dtype, n, d, v, ct, cv, temperature=0.7, bias=False, masked_every=0, grads="both"):
    h, w, b, labels = make_inputs(n, d, v, dtype, device, bias=bias, masked_every=masked_every)
    h.requires_grad_()
    w.requires_grad_()
    if b is not None:
        b.requires_grad_()
    e, lp = linear_entropy_and_logprobs(h, w, labels, temperature, bias=b, chunk_tokens=ct, chunk_vocab=cv)
    assert e.dtype == lp.dtype == torch.float32 and e.shape == lp.shape == (n,)
    g_e = torch.randn(n, device=device) if grads in ("both", "entropy") else None
    g_lp = torch.randn(n, device=device) if grads in ("both", "logprob") else None
    loss = 0
    if g_e is not None:
        loss = loss + (e * g_e).sum()
    if g_lp is not None:
        loss = loss + (lp * g_lp).sum()
    loss.backward()
    re, rlp, rdh, rdw, rdb = reference_grads(h, w, b, labels, temperature, g_e, g_lp, dtype)
    assert_close(e, re, VALUE_TOL[dtype], "entropy")
    assert_close(lp, rlp, VALUE_TOL[dtype], "logprobs")
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert_grad_close(h.grad, rdh, GRAD_RTOL[dtype], "d_hidden")
    assert_grad_close(w.grad, rdw, GRAD_RTOL[dtype], "d_weight")
    if b is not None:
        assert_grad_close(b.grad, rdb, GRAD_RTOL[dtype], "d_bias")


# vocabularies not divisible by any block, blocks larger than the inputs, a one-token vocabulary
SHAPES = [(37, 16, 301, 8, 64), (5, 8, 1, 4, 4), (20, 12, 97, 64, 1000), (33, 8, 130, 7, 13)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(target, dtype, shape):
    device, _ = target
    if dtype == torch.float16 and device.type == "cpu" and shape[0] * shape[2] > 5000:
        pytest.skip("float16 CPU matmuls are slow; one fp16 shape is enough")
    run_case(device, dtype, *shape)


@pytest.mark.parametrize("grads", ["entropy", "logprob"])
def test_grad_through_one_output(target, grads):
    run_case(target[0], torch.float32, 19, 8, 75, 8, 32, grads=grads)


def test_bias_with_masked_tokens(target):
    run_case(target[0], torch.float32, 23, 8, 150, 8, 40, temperature=1.3, bias=True, masked_every=5)


def test_large_logits_and_low_temperature(target):
    device, _ = target
    h, w, _, labels = make_inputs(16, 8, 200, torch.float32, device, scale=8.0)
    e, lp = linear_entropy_and_logprobs(h, w, labels, 0.25, chunk_tokens=5, chunk_vocab=33)
    re, rlp = reference.linear_entropy_and_logprobs(h, w, labels, 0.25)
    assert_close(e, re, 2e-5, "entropy")
    assert_close(lp, rlp, 2e-5, "logprobs")


def test_token_entropy_leading_shape_empty_and_strided(target):
    device, _ = target
    d, v = 8, 90
    w = torch.randn(v, d, device=device)
    wide = torch.randn(2, 3, 2 * d, device=device)
    h = wide[..., ::2]  # strided features
    assert not h.is_contiguous()
    e = linear_token_entropy(h, w, 0.9, chunk_tokens=4, chunk_vocab=32)
    assert e.shape == (2, 3) and e.dtype == torch.float32
    assert_close(e, reference.linear_entropy_and_logprobs(h, w, None, 0.9)[0], 2e-5, "entropy")
    # the labelled op gives the same entropy
    labels = torch.randint(0, v, (2, 3), device=device)
    e2, lp2 = linear_entropy_and_logprobs(h, w, labels, 0.9, chunk_tokens=4, chunk_vocab=32)
    assert torch.equal(e, e2) and lp2.shape == (2, 3)
    # N = 0
    h0 = torch.randn(0, d, device=device, requires_grad=True)
    w0 = w.clone().requires_grad_()
    e0, lp0 = linear_entropy_and_logprobs(h0, w0, torch.zeros(0, dtype=torch.long, device=device))
    assert e0.shape == lp0.shape == (0,)
    (e0.sum() + lp0.sum()).backward()
    assert h0.grad.shape == (0, d) and torch.count_nonzero(w0.grad) == 0


def test_strided_hidden_gradient(target):
    device, _ = target
    d, v, n = 8, 77, 12
    base = torch.randn(d, n, device=device, requires_grad=True)
    h = base.T  # transposed: row stride 1
    w = torch.randn(v, d, device=device, requires_grad=True)
    labels = torch.randint(0, v, (n,), device=device)
    e, lp = linear_entropy_and_logprobs(h, w, labels, chunk_tokens=5, chunk_vocab=20)
    (e.sum() - lp.sum()).backward()
    _, _, rdh, rdw, _ = reference_grads(h, w, None, labels, 1.0, torch.ones(n), -torch.ones(n), torch.float32)
    assert_grad_close(base.grad.T, rdh, 1e-4, "d_hidden")
    assert_grad_close(w.grad, rdw, 1e-4, "d_weight")


def test_nan_row_gives_nan(target):
    device, _ = target
    h, w, _, labels = make_inputs(6, 8, 40, torch.float32, device)
    h[2, 0] = torch.nan
    e, lp = linear_entropy_and_logprobs(h, w, labels, chunk_tokens=4, chunk_vocab=16)
    assert torch.isnan(e[2]) and torch.isnan(lp[2])
    assert bool(torch.isfinite(e[[0, 1, 3, 4, 5]]).all())


def test_deterministic(target):
    device, _ = target
    h, w, _, labels = make_inputs(30, 8, 100, torch.float32, device)
    outs = []
    for _ in range(2):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        e, lp = linear_entropy_and_logprobs(hh, ww, labels, chunk_tokens=8, chunk_vocab=32)
        (e.sum() + lp.sum()).backward()
        outs.append((e, lp, hh.grad, ww.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_bad_input():
    h, w, _, labels = make_inputs(4, 8, 10, torch.float32, "cpu")
    with pytest.raises(ValueError, match="labels must lie in"):
        linear_entropy_and_logprobs(h, w, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="labels must lie in"):
        linear_entropy_and_logprobs(h, w, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(TypeError, match="labels must be an integer"):
        linear_entropy_and_logprobs(h, w, labels.float())
    with pytest.raises(ValueError, match="labels must have shape"):
        linear_entropy_and_logprobs(h, w, labels[:3])
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):
        linear_entropy_and_logprobs(h, w.double(), labels)
    with pytest.raises(ValueError, match="weight must have shape"):
        linear_entropy_and_logprobs(h, w[:, :4], labels)
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_entropy_and_logprobs(h, w, labels, bias=torch.zeros(3))
    with pytest.raises(ValueError, match="temperature"):
        linear_entropy_and_logprobs(h, w, labels, 0.0)
    with pytest.raises(ValueError, match="chunk_vocab"):
        linear_entropy_and_logprobs(h, w, labels, chunk_vocab=0)
    with pytest.raises(TypeError, match="chunk_tokens"):
        linear_entropy_and_logprobs(h, w, labels, chunk_tokens=2.5)
    with pytest.raises(TypeError, match="hidden must be a floating"):
        linear_token_entropy(labels, w)
    with pytest.raises(TypeError, match="linear_token_entropy"):
        linear_entropy_and_logprobs(h, w, None)


class _Allocations(TorchDispatchMode):
    """Records the element count of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _saved_extra_bytes(fn, inputs):
    """Bytes of the tensors autograd saves while running ``fn`` that are not views of ``inputs``."""
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in input_ptrs:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(saved), out


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_memory_is_blocked_not_n_by_v(backend, monkeypatch):
    """Retained tensors are O(N) (independent of V); no tensor created in forward + backward
    reaches N x V elements: the largest is one logits block or a weight-sized gradient."""
    monkeypatch.setenv("HEAL_KERNELS_BACKEND", backend)
    n, d, ct, cv = 512, 8, 64, 128
    extra = {}
    for v in (1000, 4000):
        h, w, b, labels = make_inputs(n, d, v, torch.float32, "cpu", bias=True)
        for t in (h, w, b):
            t.requires_grad_()
        nbytes, (e, lp) = _saved_extra_bytes(
            lambda: linear_entropy_and_logprobs(h, w, labels, 0.7, bias=b, chunk_tokens=ct, chunk_vocab=cv),
            [h, w, b, labels],
        )
        extra[v] = nbytes
        assert nbytes <= 8 * n, f"saved {nbytes} bytes beyond the inputs for N={n}, V={v}"
        mode = _Allocations()
        with mode:
            e, lp = linear_entropy_and_logprobs(h, w, labels, 0.7, bias=b, chunk_tokens=ct, chunk_vocab=cv)
            (e.sum() + lp.sum()).backward()
        assert mode.largest <= max(ct * cv, v * d), f"largest tensor {mode.largest} elements (N x V = {n * v})"
    assert extra[1000] == extra[4000]
    # the unfused path does create N x V (the check above can fail)
    mode = _Allocations()
    with mode:
        heal_kernels.entropy_and_logprobs(h @ w.T + b, labels, 0.7)
    assert mode.largest >= n * 4000


def test_cpu_extension_builds_and_agrees(monkeypatch):
    from heal_kernels.cpu import load_extension

    if load_extension("heal_linear", ["linear.cpp"]) is None:
        pytest.skip("no C++ compiler: the CPU path is the chunked-torch one")
    h, w, b, labels = make_inputs(40, 8, 300, torch.float32, "cpu", bias=True, masked_every=7)
    results = {}
    for backend in ("cpu", "torch"):
        monkeypatch.setenv("HEAL_KERNELS_BACKEND", backend)
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        e, lp = linear_entropy_and_logprobs(hh, ww, labels, 0.8, bias=b, chunk_tokens=16, chunk_vocab=64)
        (e.sum() + 0.5 * lp.sum()).backward()
        results[backend] = (e, lp, hh.grad, ww.grad)
    for a, c in zip(results["cpu"], results["torch"]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# vocabulary parallel: 2 CPU processes (gloo)
# --------------------------------------------------------------------------------------------


def test_vocab_parallel_two_processes(tmp_path):
    """Two gloo processes each hold half the vocabulary: both get the full-vocabulary values, their
    own shard's weight / bias gradients, and d_hidden contributions that sum to the full one."""
    n, d, v = 21, 8, 2 * 45
    h, w, b, labels = make_inputs(n, d, v, torch.float32, "cpu", bias=True, masked_every=9)
    labels[0], labels[1] = 1, v - 1  # labels at both shards' far ends
    g_e, g_lp = torch.randn(n), torch.randn(n)
    torch.save((h, w, b, labels, g_e, g_lp, 0.7), tmp_path / "inputs.pt")
    worker = os.path.join(os.path.dirname(__file__), "vocab_parallel_worker.py")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, HEAL_KERNELS_BACKEND="torch", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(rank), "2", str(tmp_path / "init"), str(tmp_path / "inputs.pt"),
             str(tmp_path / f"out{rank}.pt")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out.decode(errors="replace")[-3000:]
    results = {rank: torch.load(tmp_path / f"out{rank}.pt") for rank in range(2)}
    re, rlp, rdh, rdw, rdb = reference_grads(h, w, b, labels, 0.7, g_e, g_lp, torch.float32)
    for rank in range(2):
        e, lp, dh, dw, db = results[rank]
        assert_close(e, re, 2e-5, f"rank {rank} entropy")
        assert_close(lp, rlp, 2e-5, f"rank {rank} logprobs")
        sl = slice(rank * 45, (rank + 1) * 45)
        assert_grad_close(dw, rdw[sl], 1e-4, f"rank {rank} d_weight shard")
        assert_grad_close(db, rdb[sl], 1e-4, f"rank {rank} d_bias shard")
    # d_hidden stays local: each rank holds its shard's contribution; their sum is the full gradient
    assert_grad_close(results[0][2] + results[1][2], rdh, 1e-4, "sum of d_hidden over ranks")
    assert not torch.allclose(results[0][2].double(), rdh, atol=1e-3)


def test_public_names():
    assert heal_kernels.linear_entropy_and_logprobs is linear_entropy_and_logprobs
    assert heal_kernels.linear_token_entropy is linear_token_entropy
    assert "linear_entropy_and_logprobs" in heal_kernels.__all__


def test_ignore_index_labels_get_a_hint():
    h, w, _, _ = make_inputs(4, 8, 10, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\).*found -100; -100 is the ignore index") as err:
        linear_entropy_and_logprobs(h, w, torch.tensor([0, -100, 2, -100]))
    assert "labels.masked_fill(labels == -100, 0)" in str(err.value)
