"""`heal bench entropy` runs end to end on a tiny shape and writes its result files."""

import argparse
import json

from heal.bench import entropy as bench


def test_bench_entropy_tiny(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        ["--device", "cpu", "--rows", "64", "--vocab", "500", "--iters", "1", "--no-compile", "--output-dir", str(tmp_path)]
    )
    assert bench.run(args) == 0
    doc = json.loads((tmp_path / "entropy-cpu.json").read_text())
    assert doc["shape"] == [64, 500] and doc["dtype"] == "float32"
    names = [r["variant"] for r in doc["results"]]
    assert names[:2] == ["heal", "torch"]
    heal = doc["results"][0]
    assert heal["fwd_ms"] > 0 and heal["fwdbwd_ms"] > 0 and "note" not in heal
    assert heal["err_entropy"] < 1e-4 and heal["err_logprob"] < 1e-4
    assert doc["bytes_floor"]["forward"] == 64 * 500 * 4
    assert (tmp_path / "entropy-cpu.md").read_text().startswith("# Token entropy")
    assert (tmp_path / "entropy-cpu.png").stat().st_size > 0


def test_microbench_cpu_forward(benchmark, monkeypatch):
    """pytest-benchmark micro-benchmark of the CPU forward (runs once when benchmarks are disabled,
    as in the default addopts; `pytest --benchmark-enable -k microbench` times it)."""
    import torch

    from heal_kernels import entropy_and_logprobs

    monkeypatch.setenv("HEAL_KERNELS_BACKEND", "cpu")
    z = torch.randn(256, 32000)
    labels = torch.randint(0, 32000, (256,))
    ent, lp = benchmark(entropy_and_logprobs, z, labels, 0.7)
    assert ent.shape == (256,) and lp.shape == (256,) and torch.isfinite(ent).all()
