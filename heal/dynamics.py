"""Packed variable-length entropy dynamics (DESIGN.md section 2).

A batch of ``B`` trajectories, trajectory ``i`` with ``n_i`` generated tokens, is held as

* ``values``: ``float32[total]``, the per-token entropies of all trajectories back to back, and
* ``cu_seqlens``: ``int32[B + 1]``, ``cu_seqlens[0] = 0``, ``cu_seqlens[i + 1] = cu_seqlens[i] + n_i``,

as flash-attention's varlen API does. Trajectory ``i`` is ``values[cu_seqlens[i]:cu_seqlens[i + 1]]``;
empty trajectories (``n_i = 0``) are allowed.

Converters: :func:`pack_padded` (a padded ``[B, T]`` tensor and its mask, what trainers hold),
:func:`pack_sequences` (a list of 1-D sequences), :func:`pack_nested` (a torch nested tensor) and back
with :func:`unpack`. :func:`validate_packed` checks a pair and raises ``ValueError`` naming the
argument (and the trajectory, for a non-finite entropy); it reads the contents back once (one
device-to-host copy of four flags on CUDA).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

__all__ = [
    "pack_padded",
    "pack_sequences",
    "pack_nested",
    "unpack",
    "lengths",
    "validate_packed",
]

Packed = Tuple[torch.Tensor, torch.Tensor]


def _cu_from_lengths(lens: torch.Tensor) -> torch.Tensor:
    cu = torch.zeros(lens.numel() + 1, dtype=torch.int64, device=lens.device)
    torch.cumsum(lens.to(torch.int64), dim=0, out=cu[1:])
    if lens.numel() and int(cu[-1]) > torch.iinfo(torch.int32).max:
        raise ValueError(f"values: {int(cu[-1])} tokens in total do not fit int32 cu_seqlens")
    return cu.to(torch.int32)


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a tensor or array, got {type(x).__name__}") from exc


def _check_padded(values, mask) -> Packed:
    """The checks of :func:`pack_padded` that read no tensor contents (types, shapes, devices)."""
    values = _as_tensor(values, "values")
    mask = _as_tensor(mask, "mask")
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D [B, T], got shape {tuple(values.shape)}")
    if not values.is_floating_point():
        raise ValueError(f"values must be a floating tensor, got dtype {values.dtype}")
    if mask.shape != values.shape:
        raise ValueError(f"mask must have the shape of values {tuple(values.shape)}, got {tuple(mask.shape)}")
    if mask.device != values.device:
        raise ValueError(f"mask is on {mask.device} but values on {values.device}")
    if mask.dtype != torch.bool and mask.is_complex():
        raise ValueError(f"mask must be bool or 0/1 numbers, got dtype {mask.dtype}")
    return values, mask


def pack_padded(values, mask) -> Packed:
    """Pack a padded ``[B, T]`` batch: keep the positions where ``mask`` is set, row by row.

    ``values``: ``[B, T]`` floating tensor (or array); padding positions may hold anything,
    NaN included. ``mask``: ``[B, T]``, bool or 0/1 integers/floats (e.g. verl's ``response_mask``).
    The mask need not be a prefix: the masked positions of each row are taken in order.
    Returns ``(values float32[total], cu_seqlens int32[B + 1])`` on ``values``' device.
    """
    values, mask = _check_padded(values, mask)
    if mask.dtype != torch.bool:
        if mask.numel():
            lo, hi = torch.aminmax(mask)  # one pass; locate the culprit only on error
            if lo < 0 or hi > 1 or (mask.is_floating_point() and bool(((mask != 0) & (mask != 1)).any())):
                row, col = (int(v) for v in ((mask != 0) & (mask != 1)).nonzero()[0])
                raise ValueError(f"mask must be bool or 0/1, got {mask[row, col].item()} at [{row}, {col}]")
        mask = mask != 0
    packed = values[mask].to(torch.float32)  # boolean indexing walks rows in order
    return packed.contiguous(), _cu_from_lengths(mask.sum(dim=1))


def _pack_padded_no_sync(values, mask) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`pack_padded` without reading anything back to the host (for CUDA tensors).

    Returns ``(packed, cu_seqlens, mask_bad)``: ``packed`` float32 ``[B * T]`` holds the packed
    values in its first ``cu_seqlens[-1]`` entries, exactly :func:`pack_padded`'s, then zeros (the
    packed length is only known on the device); ``cu_seqlens`` int32 ``[B + 1]`` as there;
    ``mask_bad`` a 0-d bool tensor, True when the mask holds a value other than 0 / 1 (then
    :func:`pack_padded` raises the error: call it once the flag has been read). The caller keeps
    ``B * T`` below 2^31 (the int32 offsets cannot overflow then). Each position moves to
    ``cumsum(mask) - 1`` (a kept one) or after the kept ones (a padding one, zeroed): a
    permutation, so one deterministic ``index_copy_`` places every element and no output size
    depends on the contents.
    """
    values, mask = _check_padded(values, mask)
    dev = values.device
    if mask.dtype != torch.bool:
        mask_bad = ((mask != 0) & (mask != 1)).any() if mask.numel() else torch.zeros((), dtype=torch.bool, device=dev)
        mask = mask != 0
    else:
        mask_bad = torch.zeros((), dtype=torch.bool, device=dev)
    keep = mask.reshape(-1)
    n = keep.numel()
    kept = torch.cumsum(keep, 0)  # int64: kept positions up to and including each one
    total = kept[-1:] if n else kept  # [1] (or [0]), stays on the device
    pos = torch.arange(n, device=dev)
    dest = torch.where(keep, kept - 1, total + pos - kept)
    src = values.reshape(-1).to(torch.float32).masked_fill(~keep, 0.0)
    packed = torch.empty(n, dtype=torch.float32, device=dev).index_copy_(0, dest, src)
    cu = torch.zeros(values.shape[0] + 1, dtype=torch.int64, device=dev)
    torch.cumsum(mask.sum(dim=1), dim=0, out=cu[1:])
    return packed, cu.to(torch.int32), mask_bad


def pack_sequences(sequences: Sequence) -> Packed:
    """Pack a list of 1-D sequences (tensors, arrays or lists of numbers; empty ones allowed).

    All tensors must be on one device; the result is ``float32`` on that device (CPU for an
    empty list or plain lists).
    """
    if isinstance(sequences, (torch.Tensor, str, bytes)) or not hasattr(sequences, "__iter__"):
        raise TypeError(f"sequences must be a list of 1-D sequences, got {type(sequences).__name__}")
    seqs: List[torch.Tensor] = []
    for i, s in enumerate(sequences):
        t = _as_tensor(s, f"sequences[{i}]")
        if t.dim() != 1:
            raise ValueError(f"sequences[{i}] must be 1-D, got shape {tuple(t.shape)}")
        if t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"sequences[{i}] must hold real numbers, got dtype {t.dtype}")
        seqs.append(t)
    devices = {t.device for t in seqs if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"sequences are on several devices: {sorted(str(d) for d in devices)}")
    device = devices.pop() if devices else torch.device("cpu")
    if not seqs:
        return torch.zeros(0, dtype=torch.float32), torch.zeros(1, dtype=torch.int32)
    values = torch.cat([t.to(device=device, dtype=torch.float32) for t in seqs])
    lens = torch.tensor([t.numel() for t in seqs], dtype=torch.int64, device=device)
    return values.contiguous(), _cu_from_lengths(lens)


def pack_nested(nested: torch.Tensor) -> Packed:
    """Pack a torch nested tensor of 1-D components (``torch.jagged`` or strided layout)."""
    if not isinstance(nested, torch.Tensor) or not nested.is_nested:
        raise TypeError(f"nested must be a torch nested tensor, got {type(nested).__name__}")
    if nested.dim() != 2:
        raise ValueError(f"nested must hold 1-D components (nested dim 2), got dim {nested.dim()}")
    if nested.layout == torch.jagged and nested.lengths() is None:
        # contiguous jagged tensor: its buffer and offsets already are the packed form
        values = nested.values()
        offsets = nested.offsets()
        lens = offsets[1:] - offsets[:-1]
        return values.to(torch.float32).contiguous(), _cu_from_lengths(lens)
    return pack_sequences(list(nested.unbind()))


def unpack(values: torch.Tensor, cu_seqlens: torch.Tensor) -> List[torch.Tensor]:
    """The list of ``B`` 1-D views ``values[cu_seqlens[i]:cu_seqlens[i + 1]]``."""
    validate_packed(values, cu_seqlens, check_finite=False)
    cu = cu_seqlens.tolist()
    return [values[cu[i] : cu[i + 1]] for i in range(len(cu) - 1)]


def lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-trajectory lengths ``int64[B]`` (``cu_seqlens[1:] - cu_seqlens[:-1]``)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must be a 1-D tensor with at least one entry")
    return (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)


def validate_packed(values: torch.Tensor, cu_seqlens: torch.Tensor, *, check_finite: bool = True) -> int:
    """Check a packed batch and return ``B``; raise ``ValueError``/``TypeError`` naming what is wrong.

    ``values`` must be a 1-D ``float32`` tensor, ``cu_seqlens`` a 1-D ``int32`` tensor on the same
    device that starts at 0, never decreases and ends at ``len(values)``. With ``check_finite``
    every entropy must be finite (a NaN or infinite entropy names its trajectory and token).
    The contents are read back once: four flags in one copy (a device-to-host sync on CUDA); only
    a batch found bad pays for locating the culprit.
    """
    bsz = _check_packed_form(values, cu_seqlens)
    _raise_packed_contents(values, cu_seqlens, _packed_flags(values, cu_seqlens, check_finite).tolist(), check_finite)
    return bsz


def _check_packed_form(values, cu_seqlens) -> int:
    """The checks of :func:`validate_packed` that read no tensor contents; returns ``B``."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D (packed), got shape {tuple(values.shape)}")
    if values.dtype != torch.float32:
        raise ValueError(f"values must be float32, got {values.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D with B + 1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != values.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but values on {values.device}")
    return cu_seqlens.numel() - 1


def _packed_flags(values: torch.Tensor, cu_seqlens: torch.Tensor, check_finite: bool = True) -> torch.Tensor:
    """int64 ``[4]`` on the device, all 0 for a good batch (of a valid form): ``cu_seqlens[0] != 0``,
    a decreasing step, ``cu_seqlens[-1] != len(values)``, and (with ``check_finite``) a non-finite sum
    of the values (the fast test: a finite sum means every entry is finite; an overflowing one only
    costs the exact search, which then finds nothing). Read nothing back."""
    cu = cu_seqlens
    no = torch.zeros((), dtype=torch.bool, device=cu.device)
    decreasing = (cu[1:] < cu[:-1]).any() if cu.numel() > 1 else no
    nonfinite = ~torch.isfinite(values.sum()) if check_finite and values.numel() else no
    return torch.stack([cu[0] != 0, decreasing, cu[-1].to(torch.int64) != values.numel(), nonfinite]).to(torch.int64)


def _raise_packed_contents(values: torch.Tensor, cu_seqlens: torch.Tensor, flags, check_finite: bool = True) -> None:
    """Raise :func:`validate_packed`'s error for the contents when ``flags`` (the host copy of
    :func:`_packed_flags`) shows one; this search reads the batch back (an error path)."""
    if not any(flags):
        return
    cu = cu_seqlens.cpu()
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
    steps = cu[1:] - cu[:-1]
    if bool((steps < 0).any()):
        i = int((steps < 0).nonzero()[0])
        raise ValueError(
            f"cu_seqlens must be non-decreasing, got cu_seqlens[{i + 1}]={int(cu[i + 1])} < cu_seqlens[{i}]={int(cu[i])}"
        )
    if int(cu[-1]) != values.numel():
        raise ValueError(f"cu_seqlens must end at len(values)={values.numel()}, got {int(cu[-1])}")
    # fast path: the sum is finite when every entry is (a finite sum that overflows only costs
    # the exact pass below, which then finds nothing)
    if check_finite and values.numel() and not bool(torch.isfinite(values.sum())):
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            pos = int(bad.nonzero()[0])
            traj = int(torch.searchsorted(cu, torch.tensor([pos], dtype=cu.dtype), right=True)[0]) - 1
            what = "a NaN" if bool(torch.isnan(values[pos])) else "an infinite"
            raise ValueError(
                f"values: trajectory {traj} has {what} entropy at token {pos - int(cu[traj])}"
            )
