"""The static performance model's arithmetic (heal bench static) on hand-made records."""

import pytest

from heal.bench import static

H100 = static.DEVICES[90]["H100 SXM"]
H200 = static.DEVICES[90]["H200"]


def _stream(ipe, warps_per_sm=64, family="entropy_fwd", bpe=2.0):
    return dict(instructions_per_element=ipe, bytes_per_element=bpe, elements_per_thread_per_iteration=16.0,
                warps_per_sm=warps_per_sm, family=family)


def test_stream_prediction_issue_and_memory_bound():
    # issue rate / copy rate for bf16 on H100: 132*4*1.98e9*32*0.9/ipe elements/s * 2 B / (0.9 * 3.35e12 B/s)
    p = static.stream_prediction(_stream(24.75), H100)
    expected = 132 * 4 * 1.98e9 * 32 * 0.9 / 24.75 * 2 / (0.9 * 3.35e12)
    assert p["issue_limit"] == pytest.approx(expected, rel=1e-3)
    assert p["bound"] == "issue" and p["fraction_of_copy"] == pytest.approx(expected, rel=1e-3)
    assert static.stream_prediction(_stream(10.25), H100)["fraction_of_copy"] == 1.0
    # the same code is relatively slower on the faster memory
    assert static.stream_prediction(_stream(16), H200)["fraction_of_copy"] < static.stream_prediction(_stream(16), H100)["fraction_of_copy"]
    # too few warps in flight: limited by memory parallelism
    few = static.stream_prediction(_stream(8, warps_per_sm=4), H100)
    assert few["bound"] == "parallelism" and few["fraction_of_copy"] < 1.0


def test_eda_prediction_counts_tiles_balance_and_l2():
    rec = dict(kwargs=dict(ROWS=2, SPLIT=1, BLOCK_J=2, BLOCK_T=4, num_warps=1), hot_loop_instructions=10,
               tail_loop_instructions=20, outer_loop_overhead_instructions=0, warps_per_sm=16)
    lengths = [8, 8, 8, 8]
    p = static.eda_prediction(rec, lengths, H100)
    # 2 programs x 2 tiles, every pair nl = 8: 2 unmasked trips of 10 instructions, no tail
    work = 2 * 2 * 2 * 10
    rate = 4 * 1.98e9 * 0.75 * 1.0 / 16  # per block slot: 16 one-warp blocks per SM
    assert p["issue_ms_balanced"] == pytest.approx(work / (rate * 132 * 16) * 1e3, rel=1e-3)
    assert p["issue_ms"] == pytest.approx(2 * 10 * 2 / rate * 1e3, rel=1e-3)  # one program per slot: its own time
    assert p["issue_ms"] >= p["issue_ms_balanced"]
    # L2: per tile 8 bytes x (its 2 columns' + its 2 rows' positions) = 8 * 32, 4 tiles
    assert p["l2_gb"] == pytest.approx(4 * 8 * 32 / 1e9, rel=1e-9)
    assert p["pair_positions"] == 16 * 8
    ragged = static.eda_prediction(rec, [8, 8, 8, 5], H100)  # a shorter column: masked tail trips cost more
    assert ragged["issue_ms_balanced"] > 0


def test_backward_families_count_half_their_bytes_as_reads():
    # a backward kernel reads z and writes dz: only the reads are in flight per trip (linear too)
    for fam in ("entropy_bwd", "linear_bwd"):
        bwd = static.stream_prediction(_stream(8, warps_per_sm=4, family=fam, bpe=4.0), H100)
        fwd = static.stream_prediction(_stream(8, warps_per_sm=4, family=fam.replace("bwd", "fwd"), bpe=4.0), H100)
        assert bwd["parallelism_limit"] == pytest.approx(fwd["parallelism_limit"] / 2, rel=1e-9)


def test_eda_preparation_ops_are_counted():
    """The op's eager launches around the pair kernel (the packing kernel, lengths, starts, buffers,
    sort, split max) are counted on the CPU; views are free. About a dozen: each costs a host launch
    (seq_stats' ~30 float64 ops are not on this path)."""
    pytest.importorskip("triton")
    n = static.eda_preparation_ops()
    assert 5 <= n <= 20
