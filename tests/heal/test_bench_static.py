"""The static performance model's arithmetic (heal bench static) on hand-made records, its reading of
unrolled SASS loops and of shared memory, and the comparison behind ``heal bench static --check``."""

import copy
import json
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------
# trips per SASS loop body (ptxas unrolling), read from the SASS against the PTX loop
# ---------------------------------------------------------------------------------------------

# The shape of entropy_bwd_bf16_gH_gLP_V112_B128_w1 on sm_90 (Triton 3.7.1): BLOCK = 128 columns on
# one warp, 4 bf16 per thread per trip (one 8-byte load, one 8-byte store); ptxas unrolled the row loop
# 4x: four LDG.E.64 / STG.E.64 at +0x100 steps, the column index UR4 += 0x200 (4 x 128), the pointers
# += 0x400 (4 x 256 bytes). One trip's work is 4 instructions here, the body 4 x 4 + 6 = 22.
SASS_UNROLLED = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   UMOV UR4, URZ ;
        /*0020*/                   LDG.E.64 R22, desc[UR6][R16.64] ;
        /*0030*/                   FADD R24, -R8, R22 ;
        /*0040*/                   FMUL R25, R24, UR9 ;
        /*0050*/                   STG.E.64 desc[UR6][R20.64], R24 ;
        /*0060*/                   LDG.E.64 R22, desc[UR6][R16.64+0x100] ;
        /*0070*/                   FADD R24, -R8, R22 ;
        /*0080*/                   FMUL R25, R24, UR9 ;
        /*0090*/                   STG.E.64 desc[UR6][R20.64+0x100], R24 ;
        /*00a0*/                   LDG.E.64 R22, desc[UR6][R16.64+0x200] ;
        /*00b0*/                   FADD R24, -R8, R22 ;
        /*00c0*/                   FMUL R25, R24, UR9 ;
        /*00d0*/                   STG.E.64 desc[UR6][R20.64+0x200], R24 ;
        /*00e0*/                   LDG.E.64 R22, desc[UR6][R16.64+0x300] ;
        /*00f0*/                   UIADD3 UR4, UP0, UR4, 0x200, URZ ;
        /*0100*/                   UIADD3.X UR5, URZ, UR5, URZ, UP0, !UPT ;
        /*0110*/                   ISETP.LE.U32.AND P1, PT, R29, UR4, PT ;
        /*0120*/                   IADD3 R16, P3, R16, 0x400, RZ ;
        /*0130*/                   FADD R24, -R8, R22 ;
        /*0140*/                   FMUL R25, R24, UR9 ;
        /*0150*/                   STG.E.64 desc[UR6][R20.64+0x300], R24 ;
        /*0160*/                   IADD3 R20, P2, R20, 0x400, RZ ;
        /*0170*/              @!P1 BRA 0x20 ;
        /*0180*/                   EXIT ;
        /*0190*/                   BRA 0x190;
"""

PTX_LOOP = """
$L__BB0_1:
	setp.lt.s64 	%p1, %rd5, 128;
	@%p1 bra 	$L__BB0_3;
$L__BB0_2:
	ld.global.v2.b32 { %r33, %r34 }, [ %rd37 + 0 ];
	sub.f32 	%r35, %r33, %r8;
	mul.f32 	%r36, %r35, %r9;
	st.global.v2.b32 [ %rd38 + 0 ], { %r35, %r36 };
	add.s64 	%rd37, %rd37, 256;
	add.s64 	%rd38, %rd38, 256;
	add.s64 	%rd39, %rd39, 128;
	setp.lt.s64 	%p2, %rd39, %rd5;
	@%p2 bra 	$L__BB0_2;
$L__BB0_3:
	@%p3 ld.global.v2.b32 { %r65, %r66 }, [ %rd26 + 0 ];
	ret;
"""


def _hot_figures():
    from heal_kernels.triton import aot

    instrs = aot.parse_sass(SASS_UNROLLED)
    _, _, body = aot.hot_loop(instrs)
    return aot.hot_loop_figures(body, PTX_LOOP, 128 / 32)


def _assert_per_element(figs):
    """The unrolled body runs 4 trips of 4 elements per thread: 22 instructions / 16 elements."""
    assert figs["hot_loop_instructions"] == 22
    assert figs["hot_loop_trips"] == 4
    assert figs["elements_per_thread_per_hot_loop_body"] == 16
    assert figs["instructions_per_element"] == pytest.approx(22 / 16)


def test_unrolled_loop_costs_per_element_of_its_body():
    """Instructions per element divide the SASS body by the elements of all the trips ptxas unrolled
    into it (the issue's V=112 backward: 148 instructions over 4 x 4 elements = 9.25, not 37)."""
    figs = _hot_figures()
    _assert_per_element(figs)
    u = figs["hot_loop_unroll"]
    assert (u["sass_load_bytes"], u["ptx_load_bytes"], u["sass_store_bytes"], u["ptx_store_bytes"]) == (32, 8, 32, 8)
    assert u["induction_confirms"] and 0x200 in u["sass_steps"] and 128 in u["ptx_steps"]  # 4 x 128 columns
    assert "problem" not in figs


def test_per_element_test_fails_without_unroll_detection(monkeypatch):
    """Mutation: with the unroll detection removed (one trip per body, the launch configuration's
    figure) the body is costed against 4 elements and the per-element check above fails."""
    from heal_kernels.triton import aot

    monkeypatch.setattr(aot, "unroll_factor", lambda sass_body, ptx_body: dict(factor=1))
    figs = _hot_figures()
    assert figs["instructions_per_element"] == pytest.approx(22 / 4)
    with pytest.raises(AssertionError):
        _assert_per_element(figs)


def test_unroll_factor_reads_one_trip_loops_and_refuses_mismatched_traffic():
    from heal_kernels.triton import aot

    instrs = aot.parse_sass(SASS_UNROLLED)
    _, _, body = aot.hot_loop(instrs)
    ptx_body = aot.ptx_hot_loop(PTX_LOOP)["body"]
    assert aot.ptx_hot_loop(PTX_LOOP)["masked"] is False  # the guarded load after the loop is not in it
    # a body of one trip (the first copy and the loop control) reads 1
    one = [i for i in body if i[0] < 0x60 or i[0] >= 0x0f0 and i[2] != "LDG.E.64"]
    one = [i for i in one if not (i[0] == 0x150)]  # keep one STG
    assert aot.unroll_factor(one, ptx_body)["factor"] == 1
    # loads say 4, stores say 3: not read, and the gate is told why
    mismatched = [i for i in body if i[0] != 0x150]
    u = aot.unroll_factor(mismatched, ptx_body)
    assert u["factor"] is None
    figs = aot.hot_loop_figures(mismatched, PTX_LOOP, 4.0)
    assert figs["hot_loop_trips"] == 1 and "trips per SASS body not read" in figs["problem"]
    # memory traffic the PTX loop does not have cannot be divided
    assert aot.unroll_factor(body, [])["factor"] is None


def test_access_widths():
    from heal_kernels.triton import aot

    assert [aot._sass_access_bytes(op) for op in ("LDG.E.128", "LDG.E.64", "LDG.E", "LDG.E.U16", "STG.E.U8",
                                                  "LDG.E.128.CONSTANT", "LDG.E.LTC128B")] == [16, 8, 4, 2, 1, 16, 4]
    assert [aot._ptx_access_bytes(op) for op in ("ld.global.v4.b32", "ld.global.v2.b32", "st.global.b16",
                                                 "ld.global.L1::evict_last.v2.b64", "ld.global.b32")] == [16, 8, 2, 16, 4]


# ---------------------------------------------------------------------------------------------
# occupancy: registers and shared memory (static + Triton's dynamic + the 1 KB reserve, once)
# ---------------------------------------------------------------------------------------------


def test_shared_memory_counts_the_reserve_once_and_the_dynamic_buffer():
    from heal_kernels.triton import aot

    # sm_90: a kernel whose only shared memory is Triton's 128-byte dynamic buffer reads SHARED:1024 (the
    # reserve, laid out by ptxas): 1024 + 128, not 1024 + 1024 + 0
    assert aot.shared_per_block(1024, 128, 90) == 1152
    assert aot.shared_per_block(0, 0, 90) == 1024  # no shared memory: the reserve alone
    assert aot.shared_per_block(0, 128, 80) == 1152  # sm_80: SHARED holds no reserve, it is added
    assert aot.shared_per_block(1024 + 100, 0, 90) == 1152  # 128-byte allocation units
    # a block of 4 warps with few registers: shared memory decides
    # 57 KB static on sm_90 (reserve included): 228 KB / 57 KB = 4 blocks (counting the reserve twice: 3)
    assert aot.occupancy(32, 57 * 1024, 4, 90) == 16
    # Triton's dynamic shared memory counts: 48 KB of it + the reserve -> 4 blocks of 4 warps, not 16
    assert aot.occupancy(32, 1024, 4, 90, dynamic_shared=48 * 1024) == 16
    assert aot.occupancy(32, 1024, 4, 90) == 64
    # sm_80: 164 KB per SM; 40 KB dynamic + 1 KB reserve -> 4 blocks
    assert aot.occupancy(32, 0, 4, 80, dynamic_shared=40 * 1024) == 16
    # registers still limit: 255 registers, 4 warps -> 2 blocks
    assert aot.occupancy(255, 1024, 4, 90, dynamic_shared=128) == 8


# ---------------------------------------------------------------------------------------------
# the committed results against a fresh run: the comparison (heal bench static --check)
# ---------------------------------------------------------------------------------------------

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _committed(arch=90):
    return json.loads((RESULTS / f"static-sm_{arch}.json").read_text())


def test_compare_names_a_changed_register_count():
    """Mutation: one register count edited in a copy of the committed JSON is the one difference, named
    by arch, variant and field with both values."""
    fresh = _committed()
    committed = copy.deepcopy(fresh)
    rec = next(r for r in committed["variants"] if r["name"].startswith("entropy_bwd_bf16_gH_gLP_V112"))
    rec["regs"] += 7
    diffs = static.compare_docs(committed, fresh)
    assert diffs == [dict(arch="sm_90", variant=rec["name"], field="regs", committed=rec["regs"],
                          fresh=rec["regs"] - 7)]
    assert static.compare_docs(fresh, copy.deepcopy(fresh)) == []


def test_compare_skips_only_wall_time_and_machine():
    fresh = _committed()
    other = copy.deepcopy(fresh)
    other["seconds"] += 100
    other["host"] = "elsewhere"
    for r in other["variants"]:
        r["compile_s"] = 99.0
    assert static.compare_docs(other, fresh) == []
    # everything else is compared: predictions (floats to 1e-9 relative), loops, spills, new or dropped keys
    eda = other["eda"]["per_device"]["H100 SXM"]
    eda["predicted_ms"] *= 1 + 1e-12  # float noise: equal
    assert static.compare_docs(other, fresh) == []
    eda["predicted_ms"] *= 1.001
    other["variants"][0]["spill_bytes"] = 8
    other["variants"][1]["old_key"] = 0  # a key the fresh run no longer writes
    del other["variants"][2]["instructions_per_element"]
    fields = {(d["variant"], d["field"]) for d in static.compare_docs(other, fresh)}
    names = [r["name"] for r in fresh["variants"]]
    assert fields == {("-", "eda.per_device.H100 SXM.predicted_ms"), (names[0], "spill_bytes"),
                      (names[1], "old_key"), (names[2], "instructions_per_element")}
    # a variant the fresh run lacks, or one the committed results lack
    other = copy.deepcopy(fresh)
    other["variants"].pop()
    assert [(d["variant"], d["committed"]) for d in static.compare_docs(other, fresh)] == [
        (names[-1], "missing from the committed results")]


def test_model_error_against_a_measurement():
    """gpu_run.sh puts the measured EDA time next to the prediction; the report says by how much the
    model was off, for the predicted device the measured GPU's name names."""
    from heal.bench import static

    doc = {"eda": {"per_device": {"H100 SXM": {"predicted_ms": 1.25, "pessimistic_ms": 2.0},
                                  "H200": {"predicted_ms": 1.0, "pessimistic_ms": 1.6}}},
           "measured": {"device": "NVIDIA H100 80GB HBM3", "eda_ms": 2.5}}
    off = static.model_error(doc)
    assert off["device"] == "H100 SXM"
    assert off["vs_nominal"] == pytest.approx(2.0) and off["vs_pessimistic"] == pytest.approx(1.25)
    doc["measured"]["device"] = "NVIDIA H200"
    assert static.model_error(doc)["vs_nominal"] == pytest.approx(2.5)
    doc["measured"]["device"] = "NVIDIA A100-SXM4-80GB"  # not a device of this architecture's report
    assert static.model_error(doc) is None
    doc["measured"] = {"device": "NVIDIA H100", "eda_ms": None}
    assert static.model_error(doc) is None


def test_report_states_the_model_error():
    """The committed sm_90 results with a measured EDA time: the report's measured section gives the
    ratios."""
    import json
    from pathlib import Path

    from heal.bench import static

    doc = json.loads((Path(__file__).resolve().parents[2] / "benchmarks/results/static-sm_90.json").read_text())
    nominal = doc["eda"]["per_device"]["H100 SXM"]["predicted_ms"]
    doc["measured"] = {"device": "NVIDIA H100 80GB HBM3", "eda_ms": 2 * nominal}
    text = static._markdown(90, doc)
    assert "the model against this measurement (H100 SXM): measured / predicted = 2.00x the nominal figure" in text


# ---------------------------------------------------------------------------------------------
# the pair kernel's L1 lines: a warp's shared lines, aligned rows, 16-byte records; unrolled masked loops
# ---------------------------------------------------------------------------------------------

TTGIR_T8 = ("#blocked1 = #ttg.blocked<{sizePerThread = [1, 1, 2], threadsPerWarp = [4, 8, 1], warpsPerCTA = [16, 1, 1], "
            "order = [2, 1, 0]}>\n#blocked2 = #ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [4, 8], "
            "warpsPerCTA = [16, 1], order = [1, 0]}>\n")


def test_pair_layout_is_read_from_the_ttgir():
    from heal_kernels.triton import aot

    assert aot.pair_layout(TTGIR_T8, 8, 16) == {"pairs_per_warp": 4, "lanes_per_pair": 8}
    assert aot.pair_layout(TTGIR_T8, 16, 16) is None  # no layout with 16 lanes per pair
    assert aot.pair_layout(TTGIR_T8, 8, 8) is None  # not the launch's warps
    assert aot.pair_layout(TTGIR_T8.replace("order = [1, 0]", "order = [0, 1]"), 8, 16) is None


def test_warp_block_needs_the_layout_and_the_kernel_to_agree():
    kw = dict(ROWS=8, BLOCK_J=8, BLOCK_T=8, WARP_ROWS=2, WARP_COLS=2)
    four = {"pairs_per_warp": 4, "lanes_per_pair": 8}
    assert static.warp_block(kw, four) == (2, 2)
    assert static.warp_block(kw, None) is None  # no layout read: no line shared
    assert static.warp_block(kw, {"pairs_per_warp": 2, "lanes_per_pair": 16}) is None  # they disagree
    assert static.warp_block(dict(kw, WARP_ROWS=1, WARP_COLS=1), four) == (1, 4)  # pairs along the columns


def _pair_rec(wide=True, layout=True, tail_trips=1, tail_instructions=50):
    def loop(n, **extra):
        return dict(instructions=n, mix={"fp32": n}, **extra)

    return dict(
        kwargs=dict(ROWS=2, SPLIT=1, BLOCK_J=2, BLOCK_T=8, WARP_ROWS=2, WARP_COLS=2, KD=1, KR=1, num_warps=1, SYM=True),
        loops=dict(direct_main=loop(10), direct_single=loop(10), direct_tail=loop(tail_instructions, trips=tail_trips),
                   rl_main=loop(20, wide_loads=1 if wide else 0), rl_single=loop(20), rl_tail=loop(30)),
        section_code={0: 100, 1: 150, 2: 130}, warps_per_sm=16,
        pair_layout={"pairs_per_warp": 4, "lanes_per_pair": 8} if layout else None)


def test_trip_lines_share_a_warps_rows_and_columns(monkeypatch):
    """Two sequences of 64: one warp holds the tile's 2 x 2 pairs, 3 of them visible (each unordered
    pair once). A direct trip: the 2 rows' 8 positions (64 aligned bytes: 1 line each), each column's
    gather (8 positions at a random offset: 1.5 lines; the two rows' are the same, counted once), and
    the hidden pair's lanes on the arrays' first line: 2 + 3 + 1 = 6. Counted per pair instead (no
    layout): 3 + 4.5 + 1 = 8.5; unaligned sequences: rows of 1.5 lines, 3 + 3 + 1.5 = 7.5."""
    from heal_kernels.triton import pairwise as tri

    kw = _pair_rec()["kwargs"]
    t = static.pair_tiles([64, 64], kw)
    assert float(static.trip_lines("direct", t, kw, _pair_rec()).sum()) == pytest.approx(6.0)
    assert float(static.trip_lines("direct", t, kw, _pair_rec(layout=False)).sum()) == pytest.approx(8.5)
    monkeypatch.setattr(tri, "ALIGN", 2)
    assert float(static.trip_lines("direct", t, kw, _pair_rec()).sum()) == pytest.approx(7.5)


def test_trip_lines_of_run_length_records(monkeypatch):
    """320 against 64 (n = 5 m, run-length): one pair's gather at stride 5, a 16-byte record per lane,
    spans (7 x 5 + 1) x 16 bytes: 1 + 4.5 lines; the column's 8 positions 1.5 lines; the warp's other
    pairs run on the first records and positions: 2 + 1.5 lines. Two 8-byte gathers instead of the
    record: 2 x 3.25 and 2 x 1.5 + 1.5."""
    from heal_kernels.triton import pairwise as tri

    monkeypatch.setattr(tri, "RL_NUM", 5)
    monkeypatch.setattr(tri, "RL_DEN", 1)
    kw = _pair_rec()["kwargs"]
    t = static.pair_tiles([320, 64], kw)
    assert int(t["rl"]["mask"].sum()) == 1
    assert float(static.trip_lines("rl", t, kw, _pair_rec()).sum()) == pytest.approx(5.5 + 1.5 + 3.5)
    assert float(static.trip_lines("rl", t, kw, _pair_rec(wide=False)).sum()) == pytest.approx(6.5 + 1.5 + 4.5)


def test_an_unrolled_masked_loop_costs_a_body_per_its_trips():
    """64 against 40 (direct): 5 unmasked trips, 3 masked; a masked body that runs 4 trips (ptxas
    unrolled it) is paid once, a one-trip body three times."""
    lengths = [64, 40]
    base = static.pair_kernel_prediction(_pair_rec(tail_instructions=0), lengths, H100)["issue_ms_balanced"]
    one = static.pair_kernel_prediction(_pair_rec(), lengths, H100)["issue_ms_balanced"] - base
    four = static.pair_kernel_prediction(_pair_rec(tail_trips=4), lengths, H100)["issue_ms_balanced"] - base
    assert one > 0 and one == pytest.approx(3 * four, rel=1e-9)
