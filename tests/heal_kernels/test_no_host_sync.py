"""With ``check=False`` the CUDA path never synchronises with the host: proved on a CPU machine.

Method. The CUDA path's Python logic runs on CPU tensors: the Triton backend under the Triton
interpreter (``HEAL_KERNELS_BACKEND=triton``, ``TRITON_INTERPRET=1``), and every decision "reading
this tensor's contents would be a host sync" (:func:`heal_kernels.ops.entropy.reading_syncs`, the
one predicate the ops and heal's EDA step use) answers as on CUDA, by adding ``"cpu"`` to its
device types. A :class:`torch.utils._python_dispatch.TorchDispatchMode` (:class:`SyncRecorder`)
records every operation that synchronises a CUDA device with the host:

* reading a value: ``aten._local_scalar_dense`` / ``aten.item`` (``.item()``, ``bool()``, ``int()``,
  ``float()``, ``if tensor``), ``aten.equal``, ``aten.is_nonzero``;
* an output size that depends on the contents: ``nonzero``, ``argwhere``, ``masked_select``,
  ``unique*``, ``bincount``, ``repeat_interleave`` without ``output_size``, ``torch.where(cond)``,
  indexing with a boolean mask (``x[mask]``, ``x[mask] = v``: a ``nonzero`` inside the kernel);
* a device-to-host copy: on CPU tensors there is no device to see, so every ``Tensor.cpu()``,
  ``Tensor.tolist()`` and ``Tensor.numpy()`` of a tensor that is not already host data is counted
  as one (the patched methods record it; ``.cpu()`` hands back a fresh copy, as on CUDA), and so is
  a ``copy_`` of device data into host data, or any op with a CPU output and an input on another
  device (only seen where a GPU is present).

Host data: what such a copy returns, and what is computed from host data alone, is host memory;
reading it costs nothing and is not counted. Everything else (inputs, factory tensors, kernel
outputs) counts as device memory: the recorder errs on the side of counting.

Excluding the interpreter. Running a kernel, the Triton interpreter copies its arguments to host
buffers and back with torch calls of its own (``new_empty``, ``set_``, ``copy_``, storage copies;
and reads of scalars, depending on the version). Those are not the code under test: a launch on
CUDA costs no sync. The recorder wraps ``InterpretedFunction.run`` (what ``kernel[grid](...)``
calls, whoever launches) and ignores every op and patched call made while a launch is in progress
(``in_kernel`` counts them, so a test can check that the exclusion is hooked at all).

Custom ops: a ``TorchDispatchMode`` sees a ``torch.library.custom_op`` as one call and runs its
implementation with the mode switched off; the recorder runs the implementation itself, with the
mode on, so the launchers behind ``heal::entropy_fwd`` / ``heal::entropy_bwd`` are checked too.

Not visible here: host-to-device copies from pageable memory (they synchronise too: heal copies
host lists from pinned memory) and ``.to("cpu")``, which is a no-op on CPU tensors. The CUDA twin
of this file, tests/heal_kernels/test_cuda_sync.py, runs the same calls under
``torch.cuda.set_sync_debug_mode("error")`` where a GPU is present.
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref

import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import heal_kernels
from heal_kernels.ops import entropy as entropy_ops

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernels on CPU tensors through the interpreter"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),  # the interpreter, on inf input
]

# ops that read a value back, or whose output size depends on the contents
_VALUE_READS = {"_local_scalar_dense", "item", "equal", "is_nonzero"}
_SIZE_FROM_CONTENTS = {
    "nonzero", "argwhere", "masked_select", "bincount",
    "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
}
_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl", "_index_put_impl_"}


def _tensors(tree):
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def sync_reason(func, args, kwargs):
    """Why ``func(*args, **kwargs)`` synchronises a CUDA device with the host, or None."""
    name = func.overloadpacket.__name__
    if name in _VALUE_READS or name in _SIZE_FROM_CONTENTS:
        return str(func)
    if name == "repeat_interleave" and func._overloadname != "self_int" and kwargs.get("output_size") is None:
        return f"{func} without output_size"
    if name == "where" and len(args) == 1:
        return f"{func} (torch.where(cond) is nonzero)"
    if name in _INDEX_OPS and len(args) > 1:
        if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1] if isinstance(i, torch.Tensor)):
            return f"{func} with a boolean index"
    return None


class SyncRecorder(TorchDispatchMode):
    """Records what would synchronise a CUDA device with the host (module docstring)."""

    def __init__(self):
        super().__init__()
        self.events = []  # one string per sync
        self.in_kernel = 0  # ops and patched calls ignored because a kernel launch was running
        self._launching = 0
        self._host = weakref.WeakValueDictionary()  # id -> tensor: host data

    # host data -------------------------------------------------------------------------------
    def is_host(self, t) -> bool:
        return self._host.get(id(t)) is t

    def mark_host(self, out):
        for t in _tensors(out):
            self._host[id(t)] = t

    @contextlib.contextmanager
    def launching(self):
        self._launching += 1
        try:
            yield
        finally:
            self._launching -= 1

    # the dispatch mode -----------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._launching:
            self.in_kernel += 1
            return func(*args, **kwargs)
        opdef = OPDEFS.get(func._schema.name)
        if opdef is not None:  # a torch.library.custom_op: run its implementation under the mode
            with self:
                return opdef._init_fn(*args, **kwargs)
        tensors = _tensors((args, kwargs))
        host = bool(tensors) and all(self.is_host(t) for t in tensors)
        if not host:
            reason = sync_reason(func, args, kwargs)
            if reason is None and func.overloadpacket.__name__ == "copy_" and self.is_host(args[0]):
                reason = f"{func} of device data into host data"
            if reason is not None:
                self.events.append(reason)
        out = func(*args, **kwargs)
        if not host:
            outs = _tensors(out)
            if any(o.device.type == "cpu" for o in outs) and any(t.device.type != "cpu" for t in tensors):
                self.events.append(f"{func}: a device-to-host copy")
        else:
            self.mark_host(out)
        return out


@contextlib.contextmanager
def record_syncs():
    """Run the CUDA path's logic on CPU tensors and yield the :class:`SyncRecorder` watching it."""
    from triton.runtime.interpreter import InterpretedFunction

    rec = SyncRecorder()
    patched = []

    def patch(owner, name, make):
        had = name in owner.__dict__
        orig = getattr(owner, name)
        setattr(owner, name, make(orig))
        patched.append((owner, name, had, orig))

    def run_wrapper(orig):
        def run(self, *args, **kwargs):
            with rec.launching():
                return orig(self, *args, **kwargs)

        return run

    def copy_to_host(orig):
        def cpu(t, *args, **kwargs):
            if rec._launching:
                rec.in_kernel += 1
                return orig(t, *args, **kwargs)
            if rec.is_host(t):
                return orig(t, *args, **kwargs)
            rec.events.append("Tensor.cpu()")
            with rec.launching():  # the copy itself is bookkeeping, not the code under test
                out = orig(t, *args, **kwargs)
                out = out.clone() if out is t else out  # on CUDA the result is a new (host) tensor
            rec.mark_host(out)
            return out

        return cpu

    def read_to_python(what):
        def make(orig):
            def read(t, *args, **kwargs):
                if rec._launching:
                    rec.in_kernel += 1
                elif not rec.is_host(t):
                    rec.events.append(what)
                return orig(t, *args, **kwargs)

            return read

        return make

    patch(InterpretedFunction, "run", run_wrapper)
    patch(torch.Tensor, "cpu", copy_to_host)
    patch(torch.Tensor, "tolist", read_to_python("Tensor.tolist()"))
    patch(torch.Tensor, "numpy", read_to_python("Tensor.numpy()"))
    try:
        with rec:
            yield rec
    finally:
        for owner, name, had, orig in reversed(patched):
            if had:
                setattr(owner, name, orig)
            else:
                delattr(owner, name)


@pytest.fixture
def cuda_logic(monkeypatch):
    """The Triton backend on CPU tensors, and CPU contents treated as CUDA's (reading them = a sync)."""
    monkeypatch.setenv("HEAL_KERNELS_BACKEND", "triton")
    monkeypatch.setattr(entropy_ops, "_SYNCING_DEVICE_TYPES", ("cuda", "cpu"))


def assert_syncs(run, expected: int, kernels: bool = True):
    """``run()`` once outside the recorder (lazy imports), then once inside it: ``expected`` syncs."""
    run()
    with record_syncs() as rec:
        out = run()
    assert len(rec.events) == expected, f"expected {expected} host sync(s), recorded {len(rec.events)}: {rec.events}"
    if kernels:
        assert rec.in_kernel > 0, "no kernel launch was seen: the interpreter exclusion is not hooked"
    return out


# ---------------------------------------------------------------------------------------------
# the recorder can fail
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("heal_test_sync::reads_back", mutates_args=())
def _reads_back(x: torch.Tensor) -> torch.Tensor:
    return x * float(x.sum().item())


@pytest.mark.parametrize(
    "form",
    [
        lambda x, m: x.sum().item(),
        lambda x, m: bool(x.any()),
        lambda x, m: int(x.argmax()),
        lambda x, m: x.nonzero(),
        lambda x, m: x[m],
        lambda x, m: x.clone().__setitem__(m, 0.0),
        lambda x, m: torch.masked_select(x, m),
        lambda x, m: torch.unique(m),
        lambda x, m: torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3])),
        lambda x, m: torch.where(m),
        lambda x, m: torch.equal(x, x),
        lambda x, m: x.cpu(),
        lambda x, m: x.tolist(),
        lambda x, m: x.numpy(),
        lambda x, m: torch.ops.heal_test_sync.reads_back(x),
    ],
    ids=["item", "bool", "int", "nonzero", "bool-index", "bool-index-put", "masked_select", "unique",
         "repeat_interleave", "where-cond", "equal", "cpu", "tolist", "numpy", "inside-custom-op"],
)
def test_recorder_catches_each_sync(form):
    x = torch.randn(6)
    m = x > 0
    with record_syncs() as rec:
        form(x, m)
    assert len(rec.events) >= 1, "the recorder missed a host sync"


def test_recorder_leaves_sync_free_ops_and_host_data_alone():
    x = torch.randn(6)
    with record_syncs() as rec:
        y = torch.where(x > 0, x, 0.0).cumsum(0)
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3]), output_size=6)
        torch.zeros(7).index_copy_(0, torch.arange(6), y)
        assert not rec.events
        host = torch.stack([y, x]).cpu()  # the one copy
        float(host[0].sum()), host[1][host[1] > 0].tolist(), bool(host.any())  # host data: free
    assert rec.events == ["Tensor.cpu()"]


# ---------------------------------------------------------------------------------------------
# the four ops with check=False: no sync
# ---------------------------------------------------------------------------------------------


def _logits(n=5, v=37, dtype=torch.float32):
    return torch.randn(n, v).to(dtype).requires_grad_()


def test_token_entropy_never_syncs(cuda_logic):
    z = _logits()

    def run():
        ent = heal_kernels.token_entropy(z, 0.7)
        ent.sum().backward()
        return ent

    assert_syncs(run, 0)


def test_device_temperature_tensor_never_syncs(cuda_logic):
    """A temperature tensor on the device is read by the kernels from device memory (forward and
    backward, the logits ops and the fused linear head): no sync, and the same bits as a float."""
    z = _logits()
    labels = torch.randint(0, 37, (5,))
    t = torch.tensor(0.7)  # stands for a CUDA tensor here

    def run():
        ent = heal_kernels.token_entropy(z, t)
        ent2, lp = heal_kernels.entropy_and_logprobs(z, labels, t)
        (ent + ent2 - lp).sum().backward()
        return ent, lp

    z.grad = None
    ent, lp = assert_syncs(run, 0)
    g = z.grad.clone()
    z.grad = None
    ent_f = heal_kernels.token_entropy(z, 0.7)
    ent2_f, lp_f = heal_kernels.entropy_and_logprobs(z, labels, 0.7)
    (ent_f + ent2_f - lp_f).sum().backward()
    assert torch.equal(ent, ent_f) and torch.equal(lp, lp_f)
    assert torch.equal(z.grad, g / 2)  # run() ran twice inside assert_syncs: its gradient accumulated

    h = torch.randn(6, 8, requires_grad=True)
    w = (torch.randn(40, 8) * 0.5).requires_grad_()

    def run_linear():
        e, p = heal_kernels.linear_entropy_and_logprobs(h, w, labels.new_tensor([1, 5, 39, 0, 7, 2]), t,
                                                        chunk_tokens=4, chunk_vocab=16)
        (e + p).sum().backward()
        return e, p

    e, p = assert_syncs(run_linear, 0)
    e_f, p_f = heal_kernels.linear_entropy_and_logprobs(h, w, labels.new_tensor([1, 5, 39, 0, 7, 2]), 0.7,
                                                        chunk_tokens=4, chunk_vocab=16)
    assert torch.equal(e, e_f) and torch.equal(p, p_f)


def test_linear_device_temperature_is_prepared_once_per_call(cuda_logic, monkeypatch):
    """The fused linear op turns a device temperature tensor into its launch constants (float32
    ``[log2(e) / T, 1 / T]``, a few device ops) once per op call, shared by its forward and backward,
    not once per block launch (here 2 x 3 blocks each way); same bits as a float temperature."""
    from heal_kernels.triton import linear as tri_linear

    calls = []
    real = tri_linear.temperature_args

    def counting(temperature, dummy):
        calls.append(isinstance(temperature, torch.Tensor))
        return real(temperature, dummy)

    monkeypatch.setattr(tri_linear, "temperature_args", counting)
    labels = torch.tensor([1, 5, 39, 0, 7, 2])
    g_e, g_lp = torch.randn(6), torch.randn(6)

    def run(temperature):
        h = torch.randn(6, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
        w = (torch.randn(40, 8, generator=torch.Generator().manual_seed(1)) * 0.5).requires_grad_()
        b = torch.randn(40, generator=torch.Generator().manual_seed(2)).requires_grad_()
        e, p = heal_kernels.linear_entropy_and_logprobs(h, w, labels, temperature, bias=b, chunk_tokens=4,
                                                        chunk_vocab=16)
        torch.autograd.backward((e, p), (g_e, g_lp))
        return e, p, h.grad, w.grad, b.grad

    out_t = run(torch.tensor(0.7))  # stands for a CUDA tensor here
    assert calls == [True], f"temperature_args ran {len(calls)} times for one op call (forward + backward)"
    calls.clear()
    out_f = run(0.7)
    assert calls and not any(calls)  # a float: by value, at each launch as before (no device work)
    for x, y in zip(out_t, out_f):
        assert torch.equal(x, y)


def test_entropy_and_logprobs_never_syncs_unchecked(cuda_logic):
    z = _logits(dtype=torch.bfloat16)
    labels = torch.randint(0, 37, (5,))

    def run():
        ent, lp = heal_kernels.entropy_and_logprobs(z, labels, 0.7)
        (ent - lp).sum().backward()
        return ent, lp

    assert_syncs(run, 0)
    # check=True reads the labels' range (and the bad-row flags) back: the recorder sees it
    with record_syncs() as rec:
        heal_kernels.entropy_and_logprobs(z, labels, 0.7, check=True)
    assert rec.events


def test_linear_entropy_and_logprobs_never_syncs_unchecked(cuda_logic):
    h = torch.randn(6, 8, requires_grad=True)
    w = (torch.randn(40, 8) * 0.5).requires_grad_()
    b = torch.randn(40, requires_grad=True)
    labels = torch.randint(0, 40, (6,))

    def run():
        ent, lp = heal_kernels.linear_entropy_and_logprobs(h, w, labels, 0.7, bias=b, chunk_tokens=4, chunk_vocab=16)
        (ent + lp).sum().backward()
        return ent, lp

    assert_syncs(run, 0)
    with record_syncs() as rec:
        heal_kernels.linear_entropy_and_logprobs(h, w, labels, 0.7, chunk_tokens=4, chunk_vocab=16, check=True)
    assert rec.events


def test_linear_unchecked_out_of_range_label_gives_nan(cuda_logic):
    """Unchecked (CUDA, check=False) labels outside [0, V): NaN log-prob, like the logits op; the
    other rows are the checked call's."""
    h = torch.randn(4, 8)
    w = torch.randn(40, 8) * 0.5
    good = torch.tensor([0, 7, 39, 20])
    ent, lp = heal_kernels.linear_entropy_and_logprobs(h, w, good, chunk_tokens=4, chunk_vocab=16)
    bad = torch.tensor([0, 40, 39, -1])
    ent2, lp2 = heal_kernels.linear_entropy_and_logprobs(h, w, bad, chunk_tokens=4, chunk_vocab=16)
    assert torch.equal(ent, ent2)
    assert torch.isnan(lp2[[1, 3]]).all() and torch.equal(lp2[[0, 2]], lp[[0, 2]])
    with pytest.raises(ValueError, match="labels must lie"):
        heal_kernels.linear_entropy_and_logprobs(h, w, bad, chunk_tokens=4, chunk_vocab=16, check=True)


def _packed(lengths=(3, 0, 9, 1, 12, 5, 7)):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return torch.rand(int(cu[-1])) * 3, cu


def test_pairwise_similarity_never_syncs_unchecked(cuda_logic):
    values, cu = _packed()
    out = assert_syncs(lambda: heal_kernels.pairwise_similarity(values, cu, check=False), 0)
    with record_syncs() as rec:
        checked = heal_kernels.pairwise_similarity(values, cu)  # check=True: reads the offsets back
    assert rec.events
    torch.testing.assert_close(out, checked, rtol=0, atol=0, equal_nan=True)  # NaN: pairs with an empty side


@pytest.mark.parametrize("pids", [None, "tensor", "list"])
def test_grouped_max_similarity_never_syncs_unchecked(cuda_logic, pids):
    values, cu = _packed()
    groups = torch.tensor([0, 1, 0, 1, 1, 0, 0])
    prompt_ids = {None: None, "tensor": torch.tensor([0, 0, 1, 1, 2, 2, 3]), "list": [0, 0, 1, 1, 2, 2, 3]}[pids]

    def run():
        return heal_kernels.grouped_max_similarity(values, cu, groups, 2, prompt_ids=prompt_ids, check=False)

    out = assert_syncs(run, 0)
    assert torch.equal(out, heal_kernels.grouped_max_similarity(values, cu, groups, 2, prompt_ids=prompt_ids))


# ---------------------------------------------------------------------------------------------
# the EDA reward and its trainer step: exactly one sync
# ---------------------------------------------------------------------------------------------


def _padded_batch(bsz=10, width=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ent = torch.rand(bsz, width, generator=g) * 2
    lens = torch.randint(0, width + 1, (bsz,), generator=g)
    lens[3] = 0
    mask = (torch.arange(width).unsqueeze(0) < lens.unsqueeze(1)).to(torch.int64)
    mask[1, 0] = 0  # not a prefix
    ent[mask == 0] = torch.nan  # padding may hold anything
    sources = ["gen" if i % 3 == 0 else "math" for i in range(bsz)]
    uids = [f"u{i // 2}" for i in range(bsz)]
    return ent, mask, sources, uids


def _same_metrics(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "eda/time_s":
            continue
        assert (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k], (k, a[k], b[k])


def test_eda_reward_syncs_once(cuda_logic):
    from heal.dynamics import pack_padded
    from heal.reward import eda_reward

    ent, mask, sources, uids = _padded_batch()
    values, cu = pack_padded(ent, mask)
    is_general = torch.tensor([s == "gen" for s in sources])
    pids = torch.tensor([int(u[1:]) for u in uids])

    def run():
        return eda_reward(values, cu, is_general, prompt_ids=pids, min_length=2)

    res = assert_syncs(run, 1)
    # an integer is_general on the device: its 0/1 check travels in the same copy
    res2 = assert_syncs(lambda: eda_reward(values, cu, is_general.to(torch.int32), prompt_ids=pids, min_length=2), 1)
    for a, b in zip(res, res2):
        assert torch.equal(a, b)


def test_eda_reward_checks_still_raise_in_order(cuda_logic):
    from heal.reward import eda_reward

    values, cu = _packed()
    bad_values = values.clone()
    bad_values[4] = torch.nan
    with pytest.raises(ValueError, match="trajectory 2 has a NaN"):
        eda_reward(bad_values, cu, torch.zeros(7, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_general must be bool or 0/1"):
        eda_reward(values, cu, torch.full((7,), 2))
    with pytest.raises(ValueError, match="cu_seqlens must end"):
        eda_reward(values[:-1], cu, torch.full((7,), 2))  # the batch's error comes first
    with pytest.raises(ValueError, match="trajectory 2 has a NaN"):
        eda_reward(bad_values, cu, torch.zeros(6, dtype=torch.bool))  # ... even before a shape error


@pytest.mark.parametrize("exclude_same_prompt", [False, True])
def test_eda_step_syncs_once_and_matches_the_exact_path(cuda_logic, monkeypatch, exclude_same_prompt):
    from heal.reward import EDAConfig, eda_step

    ent, mask, sources, uids = _padded_batch()
    cfg = EDAConfig(general_sources=("gen",), min_length=2, exclude_same_prompt=exclude_same_prompt)

    result, metrics = assert_syncs(lambda: eda_step(ent, mask, sources, uids, cfg), 1)
    # the CPU's path (exact packing, eda_reward's checks read up front) on the same Triton kernels
    monkeypatch.setattr(entropy_ops, "_SYNCING_DEVICE_TYPES", ("cuda",))
    exact, exact_metrics = eda_step(ent, mask, sources, uids, cfg)
    for a, b in zip(result, exact):
        assert torch.equal(a, b)
    _same_metrics(metrics, exact_metrics)
    assert metrics["eda/num_general"] == 4 and 0 < metrics["eda/rate_target"] < 1


def test_eda_step_checks_raise_after_the_copy(cuda_logic):
    from heal.reward import EDAConfig, eda_step

    ent, mask, sources, uids = _padded_batch()
    cfg = EDAConfig(general_sources=("gen",), min_length=2)
    bad_mask = mask.clone()
    bad_mask[2, 1] = 2
    with pytest.raises(ValueError, match=r"mask must be bool or 0/1, got 2 at \[2, 1\]"):
        eda_step(ent, bad_mask, sources, uids, cfg)
    bad_ent = ent.clone()
    bad_ent[4, 2] = torch.inf
    with pytest.raises(ValueError, match="trajectory 4 has an infinite entropy at token 2"):
        eda_step(bad_ent, mask, sources, uids, cfg)
    with pytest.raises(ValueError, match="mask must be bool"):  # the mask's error comes first
        eda_step(bad_ent, bad_mask, sources, uids, cfg)


def test_add_to_last_token_never_syncs(cuda_logic):
    from heal.reward import add_to_last_token

    ent, mask, _, _ = _padded_batch()
    scores = torch.randn(ent.shape)
    bonus = (torch.rand(ent.shape[0]) > 0.5).float()
    out = assert_syncs(lambda: add_to_last_token(scores, bonus, mask), 0, kernels=False)
    expected = scores.clone()
    for i in range(ent.shape[0]):
        cols = mask[i].nonzero()
        if len(cols):
            expected[i, cols[-1, 0]] += bonus[i]
    assert torch.equal(out, expected)
