"""`heal bench linear` runs end to end on tiny shapes and writes its result files."""

import argparse
import json

from heal.bench import linear as bench


def test_bench_linear_tiny(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        ["--device", "cpu", "--shape", "64x16x500", "--shape", "8x8x33", "--iters", "1",
         "--chunk-tokens", "16", "--chunk-vocab", "128", "--output-dir", str(tmp_path)]
    )
    assert bench.run(args) == 0
    doc = json.loads((tmp_path / "linear-cpu.json").read_text())
    assert [r["shape"] for r in doc["runs"]] == [{"tokens": 64, "hidden": 16, "vocab": 500},
                                                 {"tokens": 8, "hidden": 8, "vocab": 33}]
    rows = {r["variant"]: r for r in doc["runs"][0]["results"]}
    assert {"matmuls only", "heal", "unfused", "verl triton", "liger"} <= set(rows)
    heal = rows["heal"]
    assert heal["fwd_ms"] > 0 and heal["fwdbwd_ms"] > 0 and "note" not in heal
    assert heal["err_entropy"] < 1e-4 and heal["err_logprob"] < 1e-4
    # what autograd keeps: O(N) floats for heal, the [N, V] logits for the unfused path
    assert heal["saved_mb"] * 2**20 <= 16 * 64
    assert rows["unfused"]["saved_mb"] * 2**20 >= 64 * 500 * 4
    assert rows["verl triton"]["note"].startswith("skipped")
    md = (tmp_path / "linear-cpu.md").read_text()
    assert md.startswith("# Entropy + log-probs from hidden states") and "load_before" in md
    assert (tmp_path / "linear-cpu.png").stat().st_size > 0


def test_bad_shape_argument():
    import pytest

    with pytest.raises(SystemExit, match="NxDxV"):
        bench._parse_shape("4096x896")
