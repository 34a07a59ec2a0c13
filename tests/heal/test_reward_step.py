"""heal.reward.EDAConfig and eda_step: the trainer-agnostic reward step."""

import math
import warnings

import numpy as np
import pytest
import torch

from heal.dynamics import pack_padded
from heal.reward import EDAConfig, eda_reward, eda_step


def test_config_defaults_and_from_dict():
    cfg = EDAConfig(general_sources=["commonsense_qa"])
    assert cfg.general_sources == ("commonsense_qa",)
    assert (cfg.weight, cfg.min_length, cfg.metric, cfg.kl_direction) == (1.0, 50, "kl", "scored_first")
    assert (cfg.general_reward, cfg.exclude_same_prompt, cfg.entropy_source) == ("mirror", False, "actor")
    assert EDAConfig(general_sources="commonsense_qa").general_sources == ("commonsense_qa",)
    cfg2 = EDAConfig.from_dict({"general_sources": ["a", "b"], "weight": 0.5, "metric": "hti"})
    assert cfg2.general_sources == ("a", "b") and cfg2.weight == 0.5 and cfg2.metric == "hti"
    assert EDAConfig.from_dict(cfg2.to_dict()) == cfg2


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("general_sources", [], "general_sources must be a non-empty list"),
        ("general_sources", None, "general_sources must be a non-empty list"),
        ("general_sources", [""], "general_sources must hold non-empty strings"),
        ("weight", "1", "weight must be a finite number"),
        ("weight", math.inf, "weight must be a finite number"),
        ("min_length", -1, "min_length must be an integer >= 0"),
        ("min_length", 2.5, "min_length must be an integer >= 0"),
        ("metric", "cosine", "metric must be one of 'kl', 'hti', 'pl'"),
        ("kl_direction", "reverse", "kl_direction must be one of 'scored_first', 'short_first'"),
        ("general_reward", "all", "general_reward must be one of"),
        ("exclude_same_prompt", "yes", "exclude_same_prompt must be true or false"),
        ("entropy_source", "vllm", "entropy_source must be one of"),
    ],
)
def test_config_errors_name_the_key(key, value, message):
    d = {"general_sources": ["gen"], key: value}
    with pytest.raises(ValueError, match=message):
        EDAConfig.from_dict(d)
    cfg = EDAConfig(general_sources=["gen"])
    setattr(cfg, key, value)  # validate() catches values set after construction too
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_config_from_dict_rejects_unknown_and_missing_keys():
    with pytest.raises(ValueError, match=r"unknown EDA config key\(s\) \['wieght'\]"):
        EDAConfig.from_dict({"general_sources": ["g"], "wieght": 2.0})
    with pytest.raises(ValueError, match="general_sources is required"):
        EDAConfig.from_dict({"weight": 2.0})
    with pytest.raises(TypeError):
        EDAConfig.from_dict(["general_sources"])


def _padded_batch(lens, seed=0, width=None):
    g = torch.Generator().manual_seed(seed)
    width = width or max(lens) + 3
    ent = torch.full((len(lens), width), math.nan)  # padding is garbage
    mask = torch.zeros(len(lens), width, dtype=torch.int64)
    for i, n in enumerate(lens):
        ent[i, :n] = torch.rand(n, generator=g) * (1 + i % 3)
        mask[i, :n] = 1
    return ent, mask


def test_eda_step_matches_eda_reward_and_metrics(device):
    lens = [80, 60, 30, 90, 70, 0, 55, 75]
    sources = ["math", "commonsense_qa", "math", "math", "commonsense_qa", "math", "math", "csqa2"]
    ent, mask = _padded_batch(lens)
    cfg = EDAConfig(general_sources=("commonsense_qa", "csqa2"), min_length=50)
    result, metrics = eda_step(ent.to(device), mask.to(device), sources, [f"u{i}" for i in range(8)], cfg)
    assert result.reward.device.type == device.type
    result = type(result)(*(t.cpu() for t in result))

    values, cu = pack_padded(ent, mask)
    is_general = torch.tensor([s in ("commonsense_qa", "csqa2") for s in sources])
    direct = eda_reward(values, cu, is_general, min_length=50)  # on the CPU
    assert torch.equal(result.reward, direct.reward) and torch.equal(result.is_general, direct.is_general)
    torch.testing.assert_close(result.s_target, direct.s_target, rtol=1e-5, atol=1e-6)  # other device: other kernel
    torch.testing.assert_close(result.s_general, direct.s_general, rtol=1e-5, atol=1e-6)

    tgt = ~is_general
    r = result.reward
    assert metrics["eda/num_target"] == 5.0 and metrics["eda/num_general"] == 3.0
    assert metrics["eda/num_short"] == 2.0  # lengths 30 and 0
    assert metrics["eda/rate_target"] == pytest.approx(float(r[tgt].mean()))
    assert metrics["eda/rate_general"] == pytest.approx(float(r[is_general].mean()))
    tok_t = torch.cat([ent[i, :n] for i, n in enumerate(lens) if not is_general[i]]).double()
    tok_g = torch.cat([ent[i, :n] for i, n in enumerate(lens) if is_general[i]]).double()
    assert metrics["eda/entropy_mean_target"] == pytest.approx(float(tok_t.mean()), rel=1e-9)
    assert metrics["eda/entropy_mean_general"] == pytest.approx(float(tok_g.mean()), rel=1e-9)
    s_intra = result.s_target[tgt]
    s_intra = s_intra[torch.isfinite(s_intra)]  # the empty target has -inf
    assert s_intra.numel() == 4
    assert metrics["eda/s_intra_mean"] == pytest.approx(float(s_intra.double().mean()))
    assert metrics["eda/s_intra_min"] == float(s_intra.min()) and metrics["eda/s_intra_max"] == float(s_intra.max())
    s_inter = result.s_general[tgt]
    s_inter = s_inter[torch.isfinite(s_inter)]
    assert metrics["eda/s_inter_mean"] == pytest.approx(float(s_inter.double().mean()))
    assert metrics["eda/s_inter_max"] == float(s_inter.max())
    assert metrics["eda/time_s"] > 0
    assert all(isinstance(v, float) for v in metrics.values())
    # deterministic
    again, metrics2 = eda_step(ent.to(device), mask.to(device), sources, [f"u{i}" for i in range(8)], cfg)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(result, again))
    metrics.pop("eda/time_s"), metrics2.pop("eda/time_s")
    assert metrics == metrics2


def test_eda_step_exclude_same_prompt_maps_uids():
    lens = [80, 60, 70, 90, 65, 75]
    sources = np.array(["math", "gen", "math", "gen", "math", "gen"], dtype=object)  # verl's non_tensor_batch
    uids = np.array(["p-a", "p-a", "p-b", "p-b", "p-c", "p-c"], dtype=object)
    ent, mask = _padded_batch(lens, seed=4)
    cfg = EDAConfig(general_sources=["gen"], exclude_same_prompt=True)
    result, _ = eda_step(ent, mask, sources, uids, cfg)
    values, cu = pack_padded(ent, mask)
    direct = eda_reward(values, cu, torch.tensor([False, True] * 3), prompt_ids=torch.tensor([0, 0, 1, 1, 2, 2]))
    for a, b in zip(result, direct):
        assert torch.equal(a, b)
    plain = eda_reward(values, cu, torch.tensor([False, True] * 3))
    assert not torch.equal(plain.s_general, result.s_general)  # the exclusion changed something
    with pytest.raises(ValueError, match="uids are required"):
        eda_step(ent, mask, sources, None, cfg)
    with pytest.raises(ValueError, match="uids has 5 entries"):
        eda_step(ent, mask, sources, uids[:5], cfg)


def test_eda_step_empty_groups_and_bad_input():
    ent, mask = _padded_batch([80, 60, 70])
    cfg = EDAConfig(general_sources=["gen"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, metrics = eda_step(ent, mask, ["math"] * 3, None, cfg)
    assert any("no trajectory in this batch comes from general_sources" in str(w.message) for w in caught)
    assert result.reward.tolist() == [0.0, 0.0, 0.0]
    assert math.isnan(metrics["eda/rate_general"]) and math.isnan(metrics["eda/entropy_mean_general"])
    assert math.isnan(metrics["eda/s_inter_mean"]) and metrics["eda/num_general"] == 0.0
    with pytest.raises(ValueError, match="data_sources has 2 entries"):
        eda_step(ent, mask, ["math"] * 2, None, cfg)
    with pytest.raises(ValueError, match="entropy must be a 2-D"):
        eda_step(ent[0], mask[0], ["math"], None, cfg)
    with pytest.raises(TypeError, match="config must be an EDAConfig"):
        eda_step(ent, mask, ["math"] * 3, None, {"general_sources": ["gen"]})
