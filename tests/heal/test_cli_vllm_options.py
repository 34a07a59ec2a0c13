"""`heal select --backend vllm` engine options: parsing, the config file, and that they reach vllm.LLM.

vllm.LLM is replaced by a recorder (the real module's attribute where vLLM is installed, a stand-in
module where it is not), so no engine starts and these tests run in every venv.
"""

import sys
import types

import pytest

import heal.rollout.vllm as hv
from heal.cli import main
from heal.rollout.vllm import EXTENSION_FQCN, PROCESSOR_FQCN, parse_vllm_args
from heal.selection import SelectConfig


def test_parse_vllm_args_values():
    got = parse_vllm_args(["max_num_seqs=64", "swap_space=0.5", "enable_prefix_caching=true", "seed=null",
                           'speculative_config={"method": "ngram", "num_speculative_tokens": 3}',
                           "kv_cache_dtype=auto", "max-num-batched-tokens=2048", "tokenizer_mode=a=b", "quantization=",
                           "hf_overrides={\"rope_theta\": 1e6}", "max_num_seqs=32"])
    assert got == {"max_num_seqs": 32, "swap_space": 0.5, "enable_prefix_caching": True, "seed": None,
                   "speculative_config": {"method": "ngram", "num_speculative_tokens": 3}, "kv_cache_dtype": "auto",
                   "max_num_batched_tokens": 2048, "tokenizer_mode": "a=b", "quantization": "",
                   "hf_overrides": {"rope_theta": 1e6}}
    assert isinstance(got["max_num_batched_tokens"], int) and isinstance(got["swap_space"], float)
    assert parse_vllm_args([]) == {}


@pytest.mark.parametrize("bad, match", [("max_num_seqs", "expects KEY=VALUE"), ("=3", "KEY must be"),
                                        ("1st=3", "KEY must be"), ("a b=1", "KEY must be")])
def test_parse_vllm_args_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_vllm_args([bad])


class _Built(BaseException):
    """Raised by the recorder instead of starting an engine (BaseException: not wrapped by VLLMBackend)."""


@pytest.fixture
def engine(monkeypatch):
    """Replace vllm.LLM with a recorder; returns the list of keyword dicts it was called with."""
    calls = []

    class Recorder:
        def __init__(self, **kwargs):
            calls.append(kwargs)
            raise _Built()

    monkeypatch.setenv("VLLM_HOST_IP", "127.0.0.1")  # VLLMBackend sets it on vLLM's CPU build
    if hv.vllm_available():
        import vllm

        monkeypatch.setattr(vllm, "LLM", Recorder)
    else:  # a stand-in module (never imported for real in this process)
        fake = types.ModuleType("vllm")
        fake.LLM = Recorder
        fake.__version__ = "0"
        monkeypatch.setitem(sys.modules, "vllm", fake)
        monkeypatch.setattr(hv, "vllm_available", lambda: True)
        monkeypatch.setattr(hv, "_processor_interfaces", lambda: ["v1", "v2"])
    return calls


@pytest.fixture
def inputs(tmp_path):
    import pandas as pd

    from heal.rollout.testing import choice_pool_rows

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    pool = tmp_path / "pool.parquet"  # a real pool: heal select checks it before building the engine
    pd.DataFrame(choice_pool_rows(4)).to_parquet(pool)
    return ["select", "--input", str(pool), "--output", str(tmp_path / "out.parquet"), "--model", str(model),
            "--k", "2"], model


def test_cli_options_reach_the_engine(engine, inputs):
    argv, model = inputs
    with pytest.raises(_Built):
        main(argv + ["--backend", "vllm", "--dtype", "bfloat16", "--tensor-parallel-size", "2",
                     "--gpu-memory-utilization", "0.55", "--max-model-len", "2048", "--no-enforce-eager",
                     "--vllm-arg", "max_num_seqs=8", "--vllm-arg",
                     'speculative_config={"method": "ngram", "num_speculative_tokens": 2}', "--no-progress"])
    (kw,) = engine
    assert kw["model"] == str(model) and kw["dtype"] == "bfloat16"
    assert kw["tensor_parallel_size"] == 2 and kw["gpu_memory_utilization"] == 0.55
    assert kw["max_model_len"] == 2048 and kw["enforce_eager"] is False
    assert kw["max_num_seqs"] == 8 and kw["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 2}
    assert kw["logits_processors"] == [PROCESSOR_FQCN] and kw["worker_extension_cls"] == EXTENSION_FQCN


def test_config_file_options_reach_the_engine(engine, inputs, tmp_path):
    argv, _ = inputs
    cfg = tmp_path / "select.yaml"
    cfg.write_text("engine: vllm\ntensor_parallel_size: 4\nenforce_eager: true\nmax_model_len: 1024\n"
                   "vllm_args:\n  max_num_seqs: 16\n  enable_prefix_caching: false\n")
    with pytest.raises(_Built):  # the command line wins over the file, key by key
        main(argv + ["--config", str(cfg), "--max-model-len", "512", "--vllm-arg", "max_num_seqs=4"])
    (kw,) = engine
    assert kw["tensor_parallel_size"] == 4 and kw["enforce_eager"] is True and kw["max_model_len"] == 512
    assert kw["max_num_seqs"] == 4 and kw["enable_prefix_caching"] is False
    assert "gpu_memory_utilization" not in kw  # not given: vLLM's default


def test_no_options_leave_vllms_defaults(engine, inputs):
    argv, _ = inputs
    with pytest.raises(_Built):
        main(argv + ["--backend", "vllm"])
    (kw,) = engine
    for key in ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "max_num_seqs"):
        assert key not in kw
    assert kw["dtype"] == "auto"


@pytest.mark.parametrize("extra, match", [
    (["--vllm-arg", "max_num_seqs"], "--vllm-arg expects KEY=VALUE"),
    (["--vllm-arg", "max_model_len=64"], "'max_model_len' has an option of its own: --max-model-len"),
    (["--vllm-arg", "worker_extension_cls=x.Y"], "'worker_extension_cls' has an option of its own"),
    (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization' must be in \\(0, 1\\]"),
    (["--tensor-parallel-size", "0"], "tensor_parallel_size' must be >= 1"),
    (["--backend", "transformers", "--max-model-len", "64"], "vLLM engine options given \\(max_model_len\\) but the "
                                                              "rollouts run on transformers"),
])
def test_bad_options_are_one_clear_line(engine, inputs, capsys, extra, match):
    import re

    argv, _ = inputs
    assert main(argv + ["--backend", "vllm"] + extra if "--backend" not in extra else argv + extra) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert err.startswith("heal select: error:") and engine == []


def test_config_file_errors_name_the_field(tmp_path):
    from heal.config import load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("vllm_args: [max_num_seqs=3]\n")
    with pytest.raises(ValueError, match="field 'vllm_args': expected a mapping"):
        load_config(bad, SelectConfig)
    bad.write_text("enforce_eager: maybe\n")
    with pytest.raises(ValueError, match="field 'enforce_eager'"):
        load_config(bad, SelectConfig)
    bad.write_text("vllm_args: {dtype: float16}\n")
    with pytest.raises(ValueError, match="'dtype' has an option of its own: --dtype"):
        load_config(bad, SelectConfig)
