"""Where the EDA runs: its CPU thread count (affinity, never torch's global setting), row ranges and
shares of the work computed by several workers, bit for bit the single-process result."""

import os
import subprocess
import sys

import pytest
import torch

import heal_kernels
from heal.integrations.verl.eda_workers import grouped_max_shard, workers_grouped_max
from heal.reward import EDAConfig, eda_reward, eda_step
from heal_kernels._backend import available_cpus, cpu_threads
from heal_kernels.ops import pairwise as pw


def _batch(bsz, seed, lo=1, hi=90):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (bsz,), generator=g)
    lens[0] = 0  # an empty trajectory: nobody's neighbour
    values = torch.rand(int(lens.sum()), generator=g) * 3
    cu = torch.zeros(bsz + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    is_general = torch.rand(bsz, generator=g) < 0.3
    prompt_ids = torch.arange(bsz) // 4
    return values, cu, is_general, prompt_ids


# --- threads ----------------------------------------------------------------------------------


def test_cpu_threads_default_is_affinity_and_explicit_is_validated():
    assert available_cpus() == len(os.sched_getaffinity(0))
    assert cpu_threads() == available_cpus()
    assert cpu_threads(3) == 3
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="num_threads"):
            cpu_threads(bad)


def test_kernel_gets_affinity_threads_not_torchs_setting(monkeypatch):
    """torch's global thread count (1, as Ray sets it in its actors) is neither used nor changed."""
    seen = []
    real = pw._run_cpu_ext

    def spy(ext, st, short_first, grouped, threads, rows=None, share=None):
        seen.append(threads)
        return real(ext, st, short_first, grouped, threads, rows, share)

    monkeypatch.setattr(pw, "_run_cpu_ext", spy)
    if pw._cpu_ext() is None:
        pytest.skip("the C++ extension cannot be built here")
    values, cu, is_general, _ = _batch(12, 0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        eda_reward(values, cu, is_general, min_length=0)
        eda_reward(values, cu, is_general, min_length=0, num_threads=3)
        _, metrics = eda_step(
            torch.rand(4, 20), torch.ones(4, 20), ["math", "math", "gen", "gen"], None,
            EDAConfig(general_sources=("gen",), min_length=0),
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert seen == [available_cpus(), 3, available_cpus()]
    assert metrics["eda/threads"] == available_cpus()


def test_affinity_mask_limits_the_default():
    """A process pinned to one CPU computes with one thread (the mask, not os.cpu_count())."""
    if available_cpus() < 2:
        pytest.skip("needs a process allowed on 2 or more CPUs")
    code = (
        "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]});"
        "from heal_kernels._backend import cpu_threads; print(cpu_threads(), os.cpu_count())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) == 1 and int(out[1]) >= 2


# --- row ranges and shards ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("bsz", [23, 150])
def test_rows_are_bit_identical_to_the_full_call(backend, bsz):
    """(B = 150 on the torch path: a row range computed in tiles of its own width differed from the
    full call in the last bits; it now reuses the full call's tiles.)"""
    values, cu, is_general, pids = _batch(bsz, 1, hi=300)
    groups = is_general.to(torch.int32)
    full = heal_kernels.grouped_max_similarity(values, cu, groups, 2, prompt_ids=pids, backend=backend)
    for begin, end in [(0, bsz), (0, 1), (5, 17), (bsz - 1, bsz), (7, 7), (bsz // 3, bsz - 2)]:
        part = heal_kernels.grouped_max_similarity(values, cu, groups, 2, prompt_ids=pids, backend=backend,
                                                   rows=(begin, end), num_threads=2)
        assert part.shape == (end - begin, 2)
        assert torch.equal(part, full[begin:end])


def test_rows_are_validated():
    values, cu, is_general, _ = _batch(6, 2)
    for bad in [(0, 7), (3, 2), (-1, 2), (0,), "0:3", (0.0, 3)]:
        with pytest.raises(ValueError, match="rows"):
            heal_kernels.grouped_max_similarity(values, cu, is_general.to(torch.int32), 2, rows=bad)


def test_share_rows_tiles_the_batch():
    for bsz in (0, 1, 5, 64, 1001):
        for count in (1, 2, 3, 8):
            shards = [pw.share_rows(bsz, k, count) for k in range(count)]
            assert shards[0][0] == 0 and shards[-1][1] == bsz
            assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
            sizes = [e - b for b, e in shards]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_shares_combine_to_the_full_call_bit_for_bit(backend):
    """The element-wise max of the shares (0 .. count - 1) is the full result at any thread count;
    with 2 or more shares no share alone is (the work is split)."""
    bsz = 150 if backend == "cpu" else 60
    values, cu, is_general, pids = _batch(bsz, 2, hi=300)
    groups = is_general.to(torch.int32)
    full = heal_kernels.grouped_max_similarity(values, cu, groups, 2, prompt_ids=pids, backend=backend)
    for count in (1, 2, 3, 5):
        for threads in (1, 2):
            parts = [heal_kernels.grouped_max_similarity(values, cu, groups, 2, prompt_ids=pids, backend=backend,
                                                         share=(k, count), num_threads=threads) for k in range(count)]
            assert all(p.shape == (bsz, 2) for p in parts)
            merged = parts[0]
            for p in parts[1:]:
                merged = torch.maximum(merged, p)
            assert torch.equal(merged, full), (count, threads)
            if count > 1:
                assert not any(torch.equal(p, full) for p in parts), (count, threads)


def test_cpu_shares_split_the_pairs_not_the_rows():
    """On the C++ kernel a share computes pairs across the whole batch: several shares write to
    the same row (a row share would leave every other row at -inf)."""
    if pw._cpu_ext() is None:
        pytest.skip("the C++ extension cannot be built here")
    values, cu, is_general, pids = _batch(150, 3, hi=300)
    groups = is_general.to(torch.int32)
    parts = [heal_kernels.grouped_max_similarity(values, cu, groups, 2, prompt_ids=pids, backend="cpu", share=(k, 2))
             for k in range(2)]
    touched = [torch.isfinite(p).any(dim=1) for p in parts]
    assert int((touched[0] & touched[1]).sum()) >= 20


def test_shares_are_validated():
    values, cu, is_general, _ = _batch(6, 2)
    groups = is_general.to(torch.int32)
    for bad in [(2, 2), (-1, 2), (0, 0), (0,), (0.0, 2), (True, 2), "0/2"]:
        with pytest.raises(ValueError, match="share"):
            heal_kernels.grouped_max_similarity(values, cu, groups, 2, share=bad)
    with pytest.raises(ValueError, match="share and rows"):
        heal_kernels.grouped_max_similarity(values, cu, groups, 2, share=(0, 2), rows=(0, 3))


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_workers_placement_equals_driver_bit_for_bit(world):
    """eda_step with the work shared out over `world` workers (each a process in verl; here called in
    turn, through the payload a worker receives) gives the driver's rewards, maxima and metrics."""
    bsz, t = 29, 70
    g = torch.Generator().manual_seed(world)
    entropy = torch.rand(bsz, t, generator=g) * 2
    mask = torch.arange(t)[None, :] < torch.randint(0, t, (bsz, 1), generator=g)
    sources = ["math" if i % 3 else "gen" for i in range(bsz)]
    uids = [f"p{i // 4}" for i in range(bsz)]
    cfg = EDAConfig(general_sources=("gen",), min_length=10, exclude_same_prompt=True)

    calls = []

    def call(payload):  # what verl's ONE_TO_ALL dispatch does: every rank gets the same payload
        calls.append(payload)
        return [grouped_max_shard(payload, rank, world) for rank in reversed(range(world))]

    report = {}
    ref, ref_metrics = eda_step(entropy, mask, sources, uids, cfg)
    got, metrics = eda_step(entropy, mask, sources, uids, cfg, grouped_max=workers_grouped_max(call, report=report))
    assert len(calls) == 1
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    for key, value in ref_metrics.items():
        if key not in ("eda/time_s", "eda/threads"):
            assert metrics[key] == value or (value != value and metrics[key] != metrics[key]), key
    assert report["eda/workers"] == world and report["eda/threads"] == available_cpus()


def test_workers_shares_must_be_one_whole_world():
    values, cu, is_general, _ = _batch(10, 3)

    def call(payload):  # a worker group that lost a rank
        return [grouped_max_shard(payload, 0, 2)]

    with pytest.raises(RuntimeError, match="shares are not"):
        eda_reward(values, cu, is_general, grouped_max=workers_grouped_max(call))

    def twice(payload):
        return [grouped_max_shard(payload, 0, 2), grouped_max_shard(payload, 0, 2)]

    with pytest.raises(RuntimeError, match="shares are not"):
        eda_reward(values, cu, is_general, grouped_max=workers_grouped_max(twice))

    def wrong_shape(payload):
        outs = [grouped_max_shard(payload, k, 2) for k in range(2)]
        outs[1]["sims"] = outs[1]["sims"][:5]
        return outs

    with pytest.raises(RuntimeError, match="shape"):
        eda_reward(values, cu, is_general, grouped_max=workers_grouped_max(wrong_shape))


def test_bench_eda_scaling_table(tmp_path):
    """`heal bench eda --scaling`: every batch size, both placements, the workers' result checked
    against the driver's (the run fails if they differ)."""
    import argparse
    import json

    from heal.bench import eda as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--scaling", "9,20", "--min-len", "1", "--max-len", "40", "--iters", "1",
                              "--device", "cpu", "--workers", "2", "--output-dir", str(tmp_path)])
    if pw._cpu_ext() is None:
        pytest.skip("the C++ extension cannot be built here")
    assert bench.run(args) == 0
    doc = json.loads((tmp_path / "eda_scaling-cpu.json").read_text())
    rows = doc["rows"]
    assert sorted({r["batch"] for r in rows}) == [9, 20]
    workers = [r for r in rows if r["placement"] == "workers"]
    assert len(workers) == 2 and all(r["note"] == "bit-identical to driver" for r in workers)
    assert (tmp_path / "eda_scaling-cpu.md").read_text().startswith("# EDA cost against batch size")
    with pytest.raises(SystemExit, match="--scaling"):
        bench.run(parser.parse_args(["--scaling", "8,x"]))
