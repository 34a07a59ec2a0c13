"""heal_kernels.token_entropy / entropy_and_logprobs against the float64 reference.

Every case runs on each backend present: the CPU path (C++ forward, ``csrc/entropy.cpp``, and the
chunked-torch backward), the pure chunked-torch path, the Triton kernels under the
Triton interpreter on CPU tensors (small shapes; the interpreter is slow) and the Triton kernels on
CUDA when a GPU is present. Comparisons are made on the same input values (bf16/fp16 inputs are
upcast before the reference): entropy and log-probs within 1e-4 absolute or 1e-5 relative,
gradients of both outputs (any mix of upstream gradients) against autograd of the reference.
"""

import math
import os

import pytest
import torch

import heal_kernels
from heal_kernels import reference
from heal_kernels.ops.entropy import entropy_and_logprobs, token_entropy

# the interpreter evaluates both sides of a `where` in numpy: -inf - -inf on masked lanes and
# log(0) for an all -inf row warn
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# (device, backend): the CPU path, the Triton interpreter on CPU, Triton on CUDA
TARGETS = [
    pytest.param(("cpu", "cpu"), id="cpu"),  # C++ forward (chunked torch when it cannot build)
    pytest.param(("cpu", "torch"), id="torch"),  # chunked torch
    pytest.param(
        ("cpu", "triton"),
        id="triton-interp",
        marks=pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (set when there is no GPU)"),
    ),
    pytest.param(("cuda", "triton"), id="cuda", marks=pytest.mark.cuda),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# gradient tolerance (relative to the largest reference gradient) per logits dtype: the gradient
# is written in the logits' dtype
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-4}


@pytest.fixture(params=TARGETS)
def target(request, monkeypatch):
    device, backend = request.param
    monkeypatch.setenv("HEAL_KERNELS_BACKEND", backend)
    return torch.device(device), backend


def assert_close_values(got: torch.Tensor, ref: torch.Tensor, what: str):
    """Within 1e-4 absolute, or 1e-5 relative where that is larger; infinities and NaN must match."""
    assert got.dtype == torch.float32, f"{what}: dtype {got.dtype}"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    got = got.detach().cpu().double()
    ref = ref.detach().cpu().double()
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), f"{what}: NaN pattern differs"
    inf = torch.isinf(ref)
    assert torch.equal(got[inf], ref[inf]), f"{what}: infinities differ"
    fin = torch.isfinite(ref)
    assert torch.isfinite(got[fin]).all(), f"{what}: non-finite where the reference is finite"
    err = (got[fin] - ref[fin]).abs()
    tol = torch.clamp(1e-5 * ref[fin].abs(), min=1e-4)
    assert (err <= tol).all(), f"{what}: max error {err.max().item():.3g} (max tol {tol.max().item():.3g})"


def assert_close_grad(got: torch.Tensor, ref: torch.Tensor, dtype, what: str):
    got = got.detach().cpu().double()
    ref = ref.detach().cpu().double()
    assert torch.isfinite(ref).all() and torch.isfinite(got).all(), f"{what}: non-finite gradient"
    scale = max(ref.abs().max().item(), 1e-3)
    err = (got - ref).abs().max().item()
    assert err <= GRAD_RTOL[dtype] * scale + 1e-6, f"{what}: max grad error {err:.3g} (scale {scale:.3g})"


def run_and_compare(logits, labels, temperature, *, grads=True, upstream=("both", "entropy", "logprob")):
    """Forward against the reference; then gradients for each upstream mix against reference autograd."""
    z = logits.detach().clone().requires_grad_(grads)
    if labels is None:
        ent, lp = token_entropy(z, temperature), None
    else:
        ent, lp = entropy_and_logprobs(z, labels, temperature)
    zr = logits.detach().cpu().double().requires_grad_(grads)
    ref_ent, ref_lp = reference.entropy_and_logprobs(zr, None if labels is None else labels.cpu(), temperature)
    assert ent.device == logits.device
    assert_close_values(ent, ref_ent, "entropy")
    if labels is not None:
        assert_close_values(lp, ref_lp, "logprobs")
    if not grads or logits.numel() == 0:
        return ent, lp
    for mix in upstream if labels is not None else ("entropy",):
        g_h = torch.randn(ent.shape, dtype=torch.float32, device=logits.device)
        g_l = torch.randn(ent.shape, dtype=torch.float32, device=logits.device)
        outs, gouts, routs = [], [], []
        if mix in ("both", "entropy"):
            outs.append(ent), gouts.append(g_h), routs.append(ref_ent)
        if mix in ("both", "logprob"):
            outs.append(lp), gouts.append(g_l), routs.append(ref_lp)
        (g,) = torch.autograd.grad(outs, [z], gouts, retain_graph=True)
        (gr,) = torch.autograd.grad(routs, [zr], [x.cpu().double() for x in gouts], retain_graph=True)
        assert g.dtype == logits.dtype and g.shape == logits.shape
        assert_close_grad(g, gr, logits.dtype, f"grad ({mix})")
    return ent, lp


def make_labels(shape, vocab, device):
    return torch.randint(0, vocab, shape, device=device)


# ---------------------------------------------------------------------------------------------
# values and gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("vocab", [1, 1000, 4097])
def test_matches_reference(target, dtype, vocab):
    device, _ = target
    rows = 6
    z = (torch.randn(rows, vocab) * 2.5).to(dtype).to(device)
    labels = make_labels((rows,), vocab, device)
    run_and_compare(z, labels, 0.7)


@pytest.mark.parametrize("temperature", [1.0, 0.3, 2.5])
def test_temperature(target, temperature):
    device, _ = target
    z = torch.randn(5, 300, device=device) * 3
    run_and_compare(z, make_labels((5,), 300, device), temperature)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("vocab", [32000, 151936])
def test_large_vocab_cpu(vocab, backend, monkeypatch):
    monkeypatch.setenv("HEAL_KERNELS_BACKEND", backend)
    z = torch.randn(3, vocab) * 4
    z[1] = z[1].to(torch.bfloat16).float()
    run_and_compare(z, make_labels((3,), vocab, "cpu"), 0.7)
    run_and_compare(z.to(torch.bfloat16), make_labels((3,), vocab, "cpu"), 1.0, upstream=("both",))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("vocab", [32000, 151936])
def test_large_vocab_cuda(dtype, vocab, monkeypatch):
    monkeypatch.setenv("HEAL_KERNELS_BACKEND", "auto")
    z = (torch.randn(64, vocab) * 4).to(dtype).cuda()
    run_and_compare(z, make_labels((64,), vocab, "cuda"), 0.7)


def test_entropy_only_and_token_entropy(target):
    device, _ = target
    z = torch.randn(4, 513, device=device)
    run_and_compare(z, None, 0.9)
    ent = token_entropy(z)
    ent2, _ = entropy_and_logprobs(z, make_labels((4,), 513, device))
    assert torch.equal(ent, ent2)


def test_leading_dims_and_empty(target):
    device, _ = target
    z = torch.randn(2, 3, 257, device=device)
    labels = make_labels((2, 3), 257, device)
    ent, lp = run_and_compare(z, labels, 1.3)
    assert ent.shape == (2, 3) and lp.shape == (2, 3)
    for shape in [(0, 50), (2, 0, 50), (0, 1)]:
        z = torch.randn(shape, device=device, requires_grad=True)
        labels = torch.zeros(shape[:-1], dtype=torch.long, device=device)
        ent, lp = entropy_and_logprobs(z, labels, 0.5)
        assert ent.shape == shape[:-1] and lp.shape == shape[:-1] and ent.dtype == torch.float32
        (ent.sum() + lp.sum()).backward()
        assert z.grad.shape == shape
    z1 = torch.randn(257, device=device)  # a single row without leading dims
    e1, l1 = entropy_and_logprobs(z1, torch.tensor(3, device=device))
    assert e1.shape == () and l1.shape == ()
    assert_close_values(e1, reference.token_entropy(z1.cpu()), "1-D entropy")


def test_strided_rows(target):
    device, _ = target
    wide = torch.randn(2, 4, 700, device=device) * 2
    z = wide[:, :, 33:633]  # rows strided by 700, last dim contiguous
    assert not z.is_contiguous()
    run_and_compare(z, make_labels((2, 4), 600, device), 0.8)
    # every other row of a 2-D tensor
    z2 = torch.randn(10, 300, device=device)[::2]
    run_and_compare(z2, make_labels((5,), 300, device), 1.0, upstream=("both",))
    # non-unit last-dimension stride (a transposed tensor)
    z3 = torch.randn(300, 4, device=device).t()
    run_and_compare(z3, make_labels((4,), 300, device), 1.0, upstream=("both",))
    # gradient lands in the wider tensor's slots only
    wide.requires_grad_(True)
    ent, lp = entropy_and_logprobs(wide[:, :, 33:633], make_labels((2, 4), 600, device))
    (ent.sum() + lp.sum()).backward()
    assert wide.grad[:, :, :33].abs().max() == 0 and wide.grad[:, :, 633:].abs().max() == 0
    assert wide.grad[:, :, 33:633].abs().max() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_masked_vocab_minus_inf(target, dtype):
    device, _ = target
    rows, vocab = 6, 1000
    z = torch.randn(rows, vocab) * 3
    mask = torch.rand(rows, vocab) < 0.4
    mask[0] = True
    mask[0, 777] = False  # a single finite entry: entropy 0
    mask[1, : vocab - 1] = True  # finite entry in the last lane only
    mask[1, vocab - 1] = False
    mask[2, 500:] = True  # a whole masked tail spanning blocks
    z[mask] = -math.inf
    z = z.to(dtype).to(device)
    finite = (~mask).nonzero()
    labels = torch.stack([finite[finite[:, 0] == r][0, 1] for r in range(rows)]).to(device)
    labels[3] = int(mask[3].nonzero()[0, 0])  # a label on a masked entry: log-prob -inf
    z_ref = z.detach().cpu().double()
    ent, lp = entropy_and_logprobs(z, labels)
    assert torch.isfinite(ent).all()
    assert lp[3].item() == -math.inf
    assert abs(ent[0].item()) < 1e-6 and abs(ent[1].item()) < 1e-6
    assert abs(lp[0].item()) < 1e-6
    run_and_compare(z, labels, 0.7)
    del z_ref


def test_all_negative_and_large_logits(target):
    device, _ = target
    z = -(torch.rand(5, 777) * 40) - 1e3  # all negative, far from 0 (a max initialised to 0 breaks)
    run_and_compare(z.to(device), make_labels((5,), 777, device), 0.7)
    z = torch.randn(4, 777) * 200  # a very peaked distribution
    z[1] = 1e4 + torch.randn(777)
    run_and_compare(z.to(device), make_labels((4,), 777, device), 1.0)
    z = torch.full((3, 777), 5.0)  # uniform: entropy log V, the same for every row
    ent = token_entropy(z.to(device))
    assert torch.allclose(ent.cpu(), torch.full((3,), math.log(777)), atol=1e-5)


def test_vocab_not_a_multiple_of_block_triton():
    """The Triton kernels with a tiny block: many blocks per row, a partial last block."""
    if not (HAS_CUDA or INTERPRET):
        pytest.skip("needs CUDA or the Triton interpreter")
    from heal_kernels.triton.entropy import entropy_backward, entropy_forward

    device = "cuda" if HAS_CUDA else "cpu"
    for vocab in (1, 15, 16, 17, 100):
        z = torch.randn(4, vocab, device=device) * 3 - 20
        z[2, ::3] = -math.inf if vocab > 1 else z[2, ::3]
        labels = torch.randint(0, vocab, (4,), device=device)
        ent, lp, stats = entropy_forward(z, labels, 0.7, block=16)
        ref_ent, ref_lp = reference.entropy_and_logprobs(z.cpu(), labels.cpu(), 0.7)
        assert_close_values(ent, ref_ent, f"entropy V={vocab}")
        assert_close_values(lp, ref_lp, f"logprobs V={vocab}")
        lse = stats[:, 0] / 0.7 + stats[:, 1] + stats[:, 2]  # logsumexp(z / T) from the saved statistics
        assert_close_values(lse, torch.logsumexp(z.cpu().double() / 0.7, -1), f"lse V={vocab}")
        g_h, g_l = torch.randn(4, device=device), torch.randn(4, device=device)
        grad = entropy_backward(z, labels, ent, stats, g_h, g_l, 0.7, block=16)
        zr = z.cpu().double().requires_grad_(True)
        e_r, l_r = reference.entropy_and_logprobs(zr, labels.cpu(), 0.7)
        (gr,) = torch.autograd.grad((e_r * g_h.cpu().double() + l_r * g_l.cpu().double()).sum(), zr)
        assert_close_grad(grad, gr, torch.float32, f"grad V={vocab}")


def test_grad_only_through_one_output_and_no_grad(target):
    device, _ = target
    z = torch.randn(3, 200, device=device, requires_grad=True)
    labels = make_labels((3,), 200, device)
    ent, lp = entropy_and_logprobs(z, labels)
    lp.sum().backward()  # entropy unused
    zr = z.detach().cpu().double().requires_grad_(True)
    reference.entropy_and_logprobs(zr, labels.cpu())[1].sum().backward()
    assert_close_grad(z.grad, zr.grad, torch.float32, "logprob-only grad")
    with torch.no_grad():
        ent = token_entropy(z)
    assert ent.grad_fn is None and not ent.requires_grad
    ent = token_entropy(z.detach())
    assert not ent.requires_grad


def test_backward_saves_no_vocab_sized_tensor(target):
    """The autograd graph keeps the logits themselves and O(N) floats, nothing else [N, V]-sized."""
    device, _ = target
    z = torch.randn(4, 3000, device=device, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.numel(), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        entropy_and_logprobs(z, make_labels((4,), 3000, device))
    big = [s for s in saved if s[0] >= 3000]
    assert big and all(ptr == z.data_ptr() for _, ptr in big), saved
    assert sum(n for n, _ in saved) <= z.numel() + 8 * 4  # the logits + a few floats per row


def test_deterministic(target):
    device, _ = target
    z = torch.randn(4, 3000, device=device, requires_grad=True)
    labels = make_labels((4,), 3000, device)
    results = []
    for _ in range(2):
        ent, lp = entropy_and_logprobs(z, labels, 0.7)
        (g,) = torch.autograd.grad(ent.sum() + 0.5 * lp.sum(), z)
        results.append((ent, lp, g))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# bad rows and bad input
# ---------------------------------------------------------------------------------------------


def test_nan_row_and_check(target):
    device, _ = target
    z = torch.randn(2, 3, 300)
    z[1, 0, 17] = math.nan
    z = z.to(device)
    labels = make_labels((2, 3), 300, device)
    ent, lp = entropy_and_logprobs(z, labels)
    assert torch.isnan(ent[1, 0]) and torch.isnan(lp[1, 0])
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 0] = False
    assert torch.isfinite(ent.cpu()[mask]).all() and torch.isfinite(lp.cpu()[mask]).all()
    with pytest.raises(ValueError, match=r"row 3\b"):
        entropy_and_logprobs(z, labels, check=True)
    z2 = torch.randn(4, 300)
    z2[2] = -math.inf  # no distribution at all
    z2 = z2.to(device)
    ent2 = token_entropy(z2)
    assert torch.isnan(ent2[2]) and torch.isfinite(ent2.cpu()[[0, 1, 3]]).all()
    with pytest.raises(ValueError, match=r"row 2\b"):
        entropy_and_logprobs(z2, make_labels((4,), 300, device), check=True)
    z3 = torch.randn(4, 300)
    z3[0, 5] = math.inf
    with pytest.raises(ValueError, match=r"row 0\b"):
        entropy_and_logprobs(z3.to(device), make_labels((4,), 300, device), check=True)
    # check=True on good input returns the same numbers
    good = torch.randn(3, 300, device=device)
    lab = make_labels((3,), 300, device)
    for a, b in zip(entropy_and_logprobs(good, lab, check=True), entropy_and_logprobs(good, lab)):
        assert torch.equal(a, b)


def test_bad_input():
    z = torch.randn(3, 10)
    labels = torch.randint(0, 10, (3,))
    with pytest.raises(TypeError, match="logits"):
        token_entropy(torch.ones(3, 10, dtype=torch.long))
    with pytest.raises(TypeError, match="logits"):
        entropy_and_logprobs(torch.ones(3, 10, dtype=torch.int32), labels)
    with pytest.raises(TypeError, match="logits"):
        token_entropy([[1.0, 2.0]])
    with pytest.raises(ValueError, match="logits"):
        token_entropy(torch.randn(3, 0))
    with pytest.raises(ValueError, match="logits"):
        token_entropy(torch.tensor(1.0))
    for bad_t in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            entropy_and_logprobs(z, labels, bad_t)
        with pytest.raises(ValueError, match="temperature"):
            token_entropy(z, bad_t)
    with pytest.raises(TypeError, match="temperature"):
        token_entropy(z, "hot")
    with pytest.raises(ValueError, match="labels"):
        entropy_and_logprobs(z, torch.randint(0, 10, (4,)))
    with pytest.raises(ValueError, match="labels"):
        entropy_and_logprobs(z, torch.randint(0, 10, (3, 1)))
    with pytest.raises(TypeError, match="labels"):
        entropy_and_logprobs(z, labels.float())
    with pytest.raises(TypeError, match="labels"):
        entropy_and_logprobs(z, labels.bool())
    with pytest.raises(TypeError, match="labels"):
        entropy_and_logprobs(z, None)
    with pytest.raises(ValueError, match="labels"):
        entropy_and_logprobs(z, torch.tensor([0, 10, 1]))
    with pytest.raises(ValueError, match="labels"):
        entropy_and_logprobs(z, torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="labels"):
        entropy_and_logprobs(z, torch.tensor([0, -100, 1]))
    with pytest.raises(ValueError, match="labels"):
        entropy_and_logprobs(z, labels.to("meta"))
    # int32 labels are fine
    e1, l1 = entropy_and_logprobs(z, labels.int())
    e2, l2 = entropy_and_logprobs(z, labels)
    assert torch.equal(l1, l2)


@pytest.mark.cuda
def test_device_mismatch_cuda():
    with pytest.raises(ValueError, match="labels"):
        entropy_and_logprobs(torch.randn(3, 10, device="cuda"), torch.zeros(3, dtype=torch.long))


def test_cpu_extension_builds_and_agrees(monkeypatch):
    """The C++ forward is what the CPU backend runs when a compiler is present; it matches the
    chunked-torch path."""
    from heal_kernels.cpu import load_extension
    from heal_kernels.ops.entropy import _cpp_forward, _torch_forward

    if load_extension("heal_entropy", ["entropy.cpp"]) is None:
        pytest.skip("no C++ toolchain: the CPU backend runs the chunked-torch path")
    for dtype in DTYPES:
        z = (torch.randn(7, 3001) * 5).to(dtype)
        z[1, ::2] = -math.inf
        z[3] = -math.inf
        z[4, 9] = math.nan
        z[5, 0] = math.inf
        labels = torch.randint(0, 3001, (7,))
        a = _cpp_forward(z, labels, 0.6)
        b = _torch_forward(z, labels, 0.6)
        for x, y in zip(a[:2], b[:2]):  # entropy, log-probs: NaN on the same (bad) rows
            assert torch.equal(torch.isnan(x), torch.isnan(y)) and torch.allclose(x, y, atol=1e-5, equal_nan=True)
        good = [0, 1, 2, 6]  # the saved statistics agree on good rows and are non-finite on bad ones
        assert torch.allclose(a[2][good], b[2][good], atol=1e-5)
        assert not torch.isfinite(a[2][[3, 4, 5]]).all(dim=1).any()


def test_public_names():
    assert heal_kernels.token_entropy is token_entropy
    assert heal_kernels.entropy_and_logprobs is entropy_and_logprobs


def test_ignore_index_labels_get_a_hint():
    """HF / TRL mark prompt and padding positions with -100; the error says what to do with them."""
    z = torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"found -100; -100 is the ignore index of HF / TRL") as err:
        entropy_and_logprobs(z, torch.tensor([0, -100, 1]))
    assert "labels.masked_fill(labels == -100, 0)" in str(err.value) and "mask" in str(err.value)
    # the documented workaround gives the log-probs of the other positions unchanged
    labels = torch.tensor([4, -100, 7])
    _, lp = entropy_and_logprobs(z, labels.masked_fill(labels == -100, 0))
    _, ref = entropy_and_logprobs(z, torch.tensor([4, 0, 7]))
    assert torch.equal(lp, ref)
    with pytest.raises(ValueError) as err:  # other negative labels: no ignore-index hint
        entropy_and_logprobs(z, torch.tensor([0, -1, 1]))
    assert "-100" not in str(err.value)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_unaligned_rows_triton(dtype):
    """Rows at every offset from a 16-byte boundary (contiguous logits of an odd vocabulary, slices
    starting mid-chunk, a sliced vocabulary of a wider tensor): the Triton kernels peel each row's head
    up to the boundary, run whole blocks from there and mask the tail; forward and backward against the
    float64 reference, and the gradient starts as far from a boundary as the logits (contiguous)."""
    if not (HAS_CUDA or INTERPRET):
        pytest.skip("needs CUDA or the Triton interpreter")
    from heal_kernels.triton.entropy import aligned_base, entropy_backward, entropy_forward

    device = "cuda" if HAS_CUDA else "cpu"
    g = torch.Generator().manual_seed(3)
    es = torch.empty(0, dtype=dtype).element_size()
    chunk = 16 // es
    cases = []
    for vocab in (1, 5, 37, 50):  # contiguous, odd vocabularies: every row at another offset
        cases.append((f"contiguous V={vocab}", torch.randn(5, vocab, generator=g).to(dtype)))
    wide = torch.randn(5, 72, generator=g).to(dtype)
    for k in range(chunk + 1):  # slices starting k elements into the row (wide rows: 144 / 288 bytes)
        cases.append((f"slice [{k}:{k + 45}]", wide[:, k:k + 45]))
    cases.append(("sliced vocabulary [:, :61]", wide[:, :61]))
    flat = torch.randn(3 + 5 * 29, generator=g).to(dtype)
    cases.append(("contiguous at storage offset 3", flat[3:].view(5, 29)))
    for name, z in cases:
        z = z.to(device)
        base, col0 = aligned_base(z)
        assert base.data_ptr() % 16 == 0 and base.data_ptr() + col0 * es == z.data_ptr(), name
        v = z.shape[1]
        labels = torch.randint(0, v, (z.shape[0],), generator=g).to(device)
        for block in (16, 64):
            ent, lp, stats = entropy_forward(z, labels, 0.7, block=block)
            ref_ent, ref_lp = reference.entropy_and_logprobs(z.cpu().double(), labels.cpu(), 0.7)
            assert_close_values(ent, ref_ent, f"entropy {name} block {block}")
            assert_close_values(lp, ref_lp, f"logprobs {name} block {block}")
            g_h, g_l = torch.randn(5, generator=g).to(device), torch.randn(5, generator=g).to(device)
            grad = entropy_backward(z, labels, ent, stats, g_h, g_l, 0.7, block=block)
            assert grad.is_contiguous() and grad.shape == z.shape
            if z.stride(0) == v:  # same offset from a boundary as the logits
                assert (grad.data_ptr() - z.data_ptr()) % 16 == 0, name
            zr = z.cpu().double().requires_grad_(True)
            e_r, l_r = reference.entropy_and_logprobs(zr, labels.cpu(), 0.7)
            (gr,) = torch.autograd.grad((e_r * g_h.cpu().double() + l_r * g_l.cpu().double()).sum(), zr)
            assert_close_grad(grad, gr, dtype, f"grad {name} block {block}")
