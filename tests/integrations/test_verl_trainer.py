"""heal_sync: config validation, reward shaping on verl's DataProto, and the real trainer's
``_compute_advantage`` (heal's shaping + verl's GRPO) over an in-memory TransferQueue."""

import math
import os

import numpy as np
import pytest

verl = pytest.importorskip("verl")

import torch  # noqa: E402
from tensordict import TensorDict  # noqa: E402

from heal.integrations.verl.settings import HealSettings  # noqa: E402
from heal.reward import EDAConfig, eda_step  # noqa: E402

GENERAL = "commonsense_qa"


# ------------------------------------------------------------------------------------------
# the heal: block
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "block,key",
    [
        ({}, "heal.general_sources"),
        ({"general_sources": []}, "heal.general_sources"),
        ({"general_sources": [GENERAL], "weight": "a"}, "heal.weight"),
        ({"general_sources": [GENERAL], "min_length": -1}, "heal.min_length"),
        ({"general_sources": [GENERAL], "metric": "cosine"}, "heal.metric"),
        ({"general_sources": [GENERAL], "kl_direction": "sideways"}, "heal.kl_direction"),
        ({"general_sources": [GENERAL], "general_reward": "always"}, "heal.general_reward"),
        ({"general_sources": [GENERAL], "exclude_same_prompt": "yes"}, "heal.exclude_same_prompt"),
        ({"general_sources": [GENERAL], "entropy_source": "vllm"}, "heal.entropy_source"),
        ({"general_sources": [GENERAL], "entropy_source": "rollout_topk"}, "heal.entropy_source"),
        ({"general_sources": [GENERAL], "fused_entropy": 1}, "heal.fused_entropy"),
        ({"general_sources": [GENERAL], "enable": "true"}, "heal.enable"),
        ({"general_sources": [GENERAL], "wieght": 1.0}, "wieght"),
        ({"general_sources": [GENERAL], "rollout_dump": 3}, "heal.rollout_dump"),
        ({"general_sources": [GENERAL], "rollout_dump": ""}, "heal.rollout_dump"),
        ({"general_sources": [GENERAL], "rollout_dump": "/"}, "heal.rollout_dump"),
    ],
)
def test_heal_block_errors_name_the_key(block, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        HealSettings.from_block(block)


def test_heal_block_parses_omegaconf_and_defaults():
    from omegaconf import OmegaConf

    s = HealSettings.from_block(OmegaConf.create({"general_sources": [GENERAL, "gsm8k_general"], "weight": 0.5}))
    assert s.enable and not s.fused_entropy and s.rollout_topk_field is None and s.rollout_dump is None
    assert s.eda.general_sources == (GENERAL, "gsm8k_general") and s.eda.weight == 0.5
    assert s.eda.min_length == 50 and s.eda.metric == "kl" and s.eda.entropy_source == "actor"
    off = HealSettings.from_block({"enable": False})
    assert not off.enable and off.eda is None
    topk = HealSettings.from_block({"general_sources": [GENERAL], "entropy_source": "rollout_topk", "rollout_topk_field": "tk"})
    assert topk.rollout_topk_field == "tk"


def test_rollout_topk_error_says_what_verl_lacks():
    with pytest.raises(ValueError, match="logprobs=0"):
        HealSettings.from_block({"general_sources": [GENERAL], "entropy_source": "rollout_topk"})


def test_truncated_topk_entropy():
    from heal.integrations.verl.rollout_topk import truncated_topk_entropy

    logits = torch.randn(5, 50, dtype=torch.float64)
    lp = torch.log_softmax(logits, -1)
    exact = -(lp.exp() * lp).sum(-1)
    top = lp.topk(20, dim=-1).values
    got = truncated_topk_entropy(top)
    want = torch.tensor([-sum(math.exp(v) * v for v in row.tolist()) for row in top], dtype=torch.float64)
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert bool((got.double() <= exact + 1e-5).all())  # a lower bound of the exact entropy
    padded = torch.cat([top[:, :3], torch.full((5, 2), -math.inf, dtype=torch.float64)], dim=1)
    assert torch.allclose(truncated_topk_entropy(padded).double(), -(top[:, :3].exp() * top[:, :3]).sum(-1), atol=1e-5)
    with pytest.raises(ValueError, match="log-probabilities"):
        truncated_topk_entropy(torch.ones(2, 3))


# ------------------------------------------------------------------------------------------
# shaping on verl's DataProto
# ------------------------------------------------------------------------------------------


def _trajectories(n_prompts=4, n=4, T=96, seed=0, n_general_prompts=2):
    """Padded [B, T] batch: GRPO groups of ``n`` rollouts; the last prompts are general-domain."""
    g = torch.Generator().manual_seed(seed)
    B = n_prompts * n
    lengths = torch.randint(40, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.int64)
    entropy = torch.rand(B, T, generator=g) * 2 * mask
    acc = torch.randint(0, 2, (B,), generator=g).float()
    scores = torch.zeros(B, T)
    scores[torch.arange(B), lengths - 1] = acc
    uids = [f"p{i // n}" for i in range(B)]
    sources = [GENERAL if i // n >= n_prompts - n_general_prompts else "medqa" for i in range(B)]
    return entropy, mask, scores, acc, lengths, uids, sources


def _dataproto(entropy, mask, scores, uids, sources, entropy_key="entropy", score_key="rm_scores"):
    from tensordict import TensorDict

    from verl import DataProto

    td = TensorDict({entropy_key: entropy, "response_mask": mask, score_key: scores}, batch_size=[entropy.shape[0]])
    return DataProto(
        batch=td,
        non_tensor_batch={"uid": np.array(uids, dtype=object), "data_source": np.array(sources, dtype=object)},
    )


@pytest.mark.parametrize("entropy_key,score_key", [("entropy", "rm_scores"), ("entropys", "token_level_scores")])
def test_shape_scores_on_dataproto(entropy_key, score_key, tmp_path):
    from heal.analysis.logs import load_rollout_dump
    from heal.integrations.verl.trainer import shape_scores

    entropy, mask, scores, acc, lengths, uids, sources = _trajectories(seed=1)
    dump = str(tmp_path / "dumps" / "rollouts.jsonl")
    settings = HealSettings.from_block(
        {"general_sources": [GENERAL], "weight": 0.5, "min_length": 50, "rollout_dump": dump}
    )
    data = _dataproto(entropy, mask, scores.clone(), uids, sources, entropy_key, score_key)
    metrics = shape_scores(data, settings, score_key=score_key, step=7)

    result, ref_metrics = eda_step(entropy, mask, sources, uids, settings.eda)
    B = entropy.shape[0]
    assert torch.equal(data.batch["eda_reward"], result.reward)
    assert torch.equal(data.batch["acc_scores"], scores)  # plain accuracy kept
    expected = scores.clone()
    expected[torch.arange(B), lengths - 1] += 0.5 * result.reward
    assert torch.equal(data.batch[score_key], expected)
    assert torch.equal(data.batch[score_key].sum(-1), acc + 0.5 * result.reward)
    for k, v in ref_metrics.items():
        if k != "eda/time_s":
            assert (math.isnan(v) and math.isnan(metrics[k])) or metrics[k] == pytest.approx(v), k
    for k in ("eda/rate_target", "eda/rate_general", "eda/entropy_mean_target", "eda/s_intra_mean", "eda/s_inter_mean",
              "eda/time_s", "heal/acc_score_target_mean", "heal/acc_score_general_mean", "heal/eda_bonus_mean"):
        assert k in metrics
    assert 0.0 < float(result.reward.sum()) < B  # the fixture exercises both outcomes

    # heal.rollout_dump: one record per trajectory, entropies = the masked input
    recs = load_rollout_dump(dump)
    assert len(recs) == B and {r["step"] for r in recs} == {7}
    for i, r in enumerate(recs):
        assert r["data_source"] == sources[i] and r["uid"] == uids[i]
        want = entropy[i][mask[i].bool()]
        assert len(r["entropy"]) == int(lengths[i])
        torch.testing.assert_close(torch.tensor(r["entropy"]), want, rtol=0, atol=1e-6)
        assert r["acc"] == float(acc[i]) and r["eda_reward"] == float(result.reward[i])
        for key, col in (("s_target", result.s_target), ("s_general", result.s_general)):
            v = float(col[i])
            assert r[key] is None if not math.isfinite(v) else r[key] == pytest.approx(v, abs=1e-6)
    shape_scores(_dataproto(entropy, mask, scores.clone(), uids, sources, entropy_key, score_key), settings,
                 score_key=score_key, step=8)
    assert [r["step"] for r in load_rollout_dump(dump)] == [7] * B + [8] * B  # appended per step


def test_shape_scores_rewards_a_target_that_moves_like_general():
    """A target trajectory whose entropy curve copies a general one's (and differs from the other
    targets') gets r_EDA = 1; the others 0 (paper eq. 4)."""
    from heal.integrations.verl.trainer import shape_scores

    T = 80
    t = torch.linspace(0, 1, T)
    general = [torch.sin(6 * t) + 1.5, torch.cos(5 * t) + 1.5]
    targets = [torch.sin(6 * t) + 1.5, 3 * t + 0.1, 3 * t + 0.2]  # target 0 mimics general 0
    entropy = torch.stack(targets + general)
    mask = torch.ones_like(entropy, dtype=torch.int64)
    scores = torch.zeros_like(entropy)
    sources = ["medqa"] * 3 + [GENERAL] * 2
    data = _dataproto(entropy, mask, scores, [f"u{i}" for i in range(5)], sources)
    shape_scores(data, HealSettings.from_block({"general_sources": [GENERAL], "general_reward": "none"}))
    assert data.batch["eda_reward"].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert float(data.batch["rm_scores"][0, -1]) == 1.0


def test_shape_scores_padding_rows_are_left_out(tmp_path):
    from heal.integrations.verl.trainer import shape_scores

    entropy, mask, scores, acc, lengths, uids, sources = _trajectories(seed=2)
    B = entropy.shape[0]
    # two verl padding rows (empty response) appended, copying a real row's metadata
    entropy = torch.cat([entropy, torch.zeros(2, entropy.shape[1])])
    mask = torch.cat([mask, torch.zeros(2, mask.shape[1], dtype=torch.int64)])
    scores = torch.cat([scores, torch.zeros(2, scores.shape[1])])
    data = _dataproto(entropy, mask, scores.clone(), uids + uids[:2], sources + sources[:2])
    settings = HealSettings.from_block({"general_sources": [GENERAL]})
    settings.rollout_dump = str(tmp_path / "r.jsonl")
    shape_scores(data, settings, row_mask=[True] * B + [False] * 2)
    result, _ = eda_step(entropy[:B], mask[:B], sources, uids, settings.eda)
    from heal.analysis.logs import load_rollout_dump

    assert len(load_rollout_dump(settings.rollout_dump)) == B  # padding rows are not dumped
    assert torch.equal(data.batch["eda_reward"][:B], result.reward)
    assert data.batch["eda_reward"][B:].tolist() == [0.0, 0.0]
    assert torch.equal(data.batch["rm_scores"][B:], scores[B:])


def test_shape_scores_errors():
    from heal.integrations.verl.trainer import shape_scores

    entropy, mask, scores, acc, lengths, uids, sources = _trajectories()
    settings = HealSettings.from_block({"general_sources": [GENERAL]})
    data = _dataproto(entropy, mask, scores, uids, sources)
    del data.non_tensor_batch["data_source"]
    with pytest.raises(KeyError, match="data_source"):
        shape_scores(data, settings)
    data = _dataproto(entropy, mask, scores, uids, sources, entropy_key="something_else")
    with pytest.raises(KeyError, match="calculate_entropy"):
        shape_scores(data, settings)


# ------------------------------------------------------------------------------------------
# the real trainer class
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer_config():
    from hydra import compose, initialize_config_dir

    cfgdir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=cfgdir, version_base=None):
        return compose(
            config_name="ppo_trainer",
            overrides=[
                "trainer.v1.trainer_mode=heal_sync",
                f"+heal.general_sources=[{GENERAL}]",
                "+heal.weight=1.0",
                "+heal.min_length=50",
                "algorithm.adv_estimator=grpo",
                "data.train_batch_size=4",
                "actor_rollout_ref.rollout.n=4",
                "actor_rollout_ref.actor.ppo_mini_batch_size=4",
                "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
                "actor_rollout_ref.model.path=/nonexistent",
                "actor_rollout_ref.rollout.temperature=0.7",
            ],
        )


def test_trainer_registered_and_builds_as_sync(trainer_config):
    from verl.trainer.ppo.v1 import PPOTrainerSync, get_trainer_cls
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

    cls = get_trainer_cls("heal_sync")
    assert issubclass(cls, PPOTrainerSync)
    trainer = cls(trainer_config)  # verl's real constructor (no Ray, no GPU needed)
    assert trainer.trainer_mode == "sync" and trainer.configured_trainer_mode == "heal_sync"
    assert type(trainer.replay_buffer) is ReplayBuffer  # the sync trainer's buffer, not the async one
    assert trainer.heal_settings.eda.general_sources == (GENERAL,)


def test_trainer_fails_at_startup_naming_the_key(trainer_config):
    from omegaconf import OmegaConf, open_dict

    from heal.integrations.verl.trainer import HealPPOTrainerSync

    bad = OmegaConf.create(OmegaConf.to_container(trainer_config))
    bad.heal.weight = "heavy"
    with pytest.raises(ValueError, match=r"heal\.weight"):
        HealPPOTrainerSync(bad)
    bad = OmegaConf.create(OmegaConf.to_container(trainer_config))
    with open_dict(bad):
        bad.algorithm.rollout_correction = {"bypass_mode": True}
    with pytest.raises(ValueError, match=r"algorithm\.rollout_correction\.bypass_mode"):
        HealPPOTrainerSync(bad)
    bad = OmegaConf.create(OmegaConf.to_container(trainer_config))
    with open_dict(bad):
        del bad["heal"]
    with pytest.raises(ValueError, match=r"heal\.general_sources"):
        HealPPOTrainerSync(bad)


class _MemoryTQ:
    """Stands in for TransferQueue's kv_batch_get / kv_batch_put (real TQ needs a Ray cluster).
    Rows are returned the way verl's agent loop stores them (verl's list_of_dict_to_tensordict)."""

    def __init__(self):
        self.rows = {}

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        from transfer_queue import KVBatchMeta

        for i, key in enumerate(keys):
            row = self.rows.setdefault((partition_id, key), {})
            if fields is not None:
                for name in fields.keys():
                    value = fields[name]
                    if isinstance(value, torch.Tensor):
                        row[name] = value.unbind()[i] if value.is_nested else value[i]
                    else:
                        row[name] = value.tolist()[i] if hasattr(value, "tolist") else value[i]
        return KVBatchMeta(partition_id=partition_id, keys=list(keys), tags=list(tags) if tags else [{} for _ in keys])

    def kv_batch_get(self, keys, partition_id, select_fields):
        from verl.utils.tensordict_utils import list_of_dict_to_tensordict

        rows = [self.rows[(partition_id, k)] for k in keys]
        names = [f for f in select_fields if all(f in r for r in rows)]
        return list_of_dict_to_tensordict([{f: r[f] for f in names} for r in rows])


class _FakeActorWorkerGroup:
    """Stands in for the actor worker group: answers compute_log_prob the way verl's engine does,
    with full-sequence (prompt + response) nested entropies and log-probs written to the TQ."""

    def __init__(self, tq, full_entropy, full_log_probs):
        self.tq, self.full_entropy, self.full_log_probs = tq, full_entropy, full_log_probs
        self.extra_info = None

    def compute_log_prob(self, batch):
        from tensordict import TensorDict

        self.extra_info = dict(batch.extra_info)
        nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
        fields = TensorDict(
            {"entropy": nested(self.full_entropy), "log_probs": nested(self.full_log_probs)}, batch_size=len(batch)
        )
        self.tq.kv_batch_put(batch.keys, batch.partition_id, fields=fields)
        return batch


def test_old_log_prob_pass_then_shaping_then_grpo(trainer_config, monkeypatch, tmp_path):
    """The trainer's real ``_compute_old_log_prob`` (entropies requested at the rollout temperature)
    and ``_compute_advantage`` (heal's shaping, then verl's own GRPO on the shaped scores); the
    accuracy score survives under ``acc_scores``."""
    import transfer_queue
    from transfer_queue import KVBatchMeta

    from heal.integrations.verl.trainer import HealPPOTrainerSync
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    tq = _MemoryTQ()
    monkeypatch.setattr(transfer_queue, "kv_batch_get", tq.kv_batch_get)
    monkeypatch.setattr(transfer_queue, "kv_batch_put", tq.kv_batch_put)

    entropy, mask, scores, acc, lengths, uids, sources = _trajectories(n_prompts=4, n=4, seed=3)
    B = entropy.shape[0]
    keys = [f"{uids[i]}_{i % 4}_0" for i in range(B)]
    g = torch.Generator().manual_seed(11)
    prompt_lens = torch.randint(3, 9, (B,), generator=g)
    fields, full_entropy, full_lp = [], [], []
    for i in range(B):
        L, P = int(lengths[i]), int(prompt_lens[i])
        fields.append(
            {
                "response_mask": mask[i, :L].clone(),
                "rm_scores": scores[i, :L].clone(),
                "responses": torch.ones(L, dtype=torch.long),
                "rollout_log_probs": -torch.rand(L, generator=g),  # rollout.calculate_log_probs (verl default)
                "uid": uids[i],
                "data_source": sources[i],
            }
        )
        # engine output over prompt + response; response token t's entropy sits at position P - 1 + t
        full_entropy.append(torch.cat([torch.full((P - 1,), 9.0), entropy[i, :L], torch.full((1,), 9.0)]))
        full_lp.append(-torch.rand(P + L, generator=g))
    tq.kv_batch_put(keys, "train", fields=list_of_dict_to_tensordict(fields))
    from omegaconf import OmegaConf

    config = OmegaConf.create(OmegaConf.to_container(trainer_config))
    config.heal.rollout_dump = str(tmp_path / "rollouts.jsonl")
    trainer = HealPPOTrainerSync(config)
    trainer.global_steps = 5
    trainer.actor_rollout_wg = _FakeActorWorkerGroup(tq, full_entropy, full_lp)
    batch = KVBatchMeta(partition_id="train", keys=keys, tags=[{} for _ in keys])
    metrics = {}
    trainer.timing_raw = {}
    batch = trainer._compute_old_log_prob(batch, metrics)
    # verl asks the actor for entropies in the old-log-prob pass, at the rollout temperature
    assert trainer.actor_rollout_wg.extra_info["calculate_entropy"] is True
    assert trainer.actor_rollout_wg.extra_info["temperature"] == 0.7
    trainer._compute_advantage(batch, metrics)

    result, _ = eda_step(entropy, mask, sources, uids, trainer.heal_settings.eda)
    got_acc = torch.stack([tq.rows[("train", k)]["acc_scores"].sum() for k in keys])
    got_shaped = torch.stack([tq.rows[("train", k)]["rm_scores"].sum() for k in keys])
    got_eda = torch.stack([torch.as_tensor(tq.rows[("train", k)]["eda_reward"]) for k in keys])
    assert torch.equal(got_acc, acc)
    assert torch.equal(got_eda, result.reward)  # EDA saw exactly the response-aligned entropies
    assert torch.allclose(got_shaped, acc + result.reward)
    for i, k in enumerate(keys):  # bonus sits on the last response token
        assert float(tq.rows[("train", k)]["rm_scores"][-1]) == pytest.approx(float(acc[i] + result.reward[i]))

    # verl's GRPO ran on the shaped score: advantage = (r - mean_group) / (std_group + eps)
    shaped = acc + result.reward
    for g_ in range(4):
        idx = [i for i in range(B) if uids[i] == f"p{g_}"]
        r = shaped[idx]
        want = (r - r.mean()) / (r.std() + 1e-6)
        got = torch.stack([tq.rows[("train", keys[i])]["advantages"][0] for i in idx])
        assert torch.allclose(got, want, atol=1e-5)
    assert "eda/rate_target" in metrics and "heal/time_s" in metrics and "actor/entropy" in metrics
    assert "heal_eda" in trainer.timing_raw

    from heal.analysis.logs import load_rollout_dump  # heal.rollout_dump, written on the driver

    recs = load_rollout_dump(str(tmp_path / "rollouts.jsonl"))
    assert [r["step"] for r in recs] == [5] * B and [r["uid"] for r in recs] == uids
    for i, r in enumerate(recs):  # the response-aligned entropies of the valid tokens
        torch.testing.assert_close(torch.tensor(r["entropy"]), entropy[i][mask[i].bool()], rtol=0, atol=1e-6)
        assert r["acc"] == float(acc[i]) and r["eda_reward"] == float(result.reward[i])


# ------------------------------------------------------------------------------------------
# heal.high_entropy_scope, heal.entropy_temperature, multi-turn conversations
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "block,key",
    [
        ({"enable": False, "high_entropy_scope": "global"}, "heal.high_entropy_scope"),
        ({"general_sources": [GENERAL], "entropy_temperature": 0.7}, "heal.entropy_temperature"),
        ({"general_sources": [GENERAL], "entropy_temperature": "hot"}, "heal.entropy_temperature"),
        ({"general_sources": [GENERAL], "entropy_temperature": True}, "heal.entropy_temperature"),
    ],
)
def test_new_keys_errors_name_the_key(block, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        HealSettings.from_block(block)


def test_new_keys_defaults_and_values():
    s = HealSettings.from_block({"general_sources": [GENERAL]})
    assert s.high_entropy_scope == "batch" and s.entropy_temperature is None and s.entropy_temperature_label == "rollout"
    s = HealSettings.from_block({"general_sources": [GENERAL], "entropy_temperature": "1.0", "high_entropy_scope": "micro_batch"})
    assert s.entropy_temperature == 1.0 and s.entropy_temperature_label == "1.0" and s.high_entropy_scope == "micro_batch"
    off = HealSettings.from_block({"enable": False, "high_entropy_scope": "batch"})
    assert off.eda is None and off.high_entropy_scope == "batch"


def test_final_output_rows_follow_verls_key_rule():
    from heal.integrations.verl.trainer import final_output_rows

    keys = ["p0_0_0", "p0_0_1", "p0_0_2", "p0_1_0", "p1_0_1", "p1_0_0", "odd-key", "a_b_c_0"]
    assert final_output_rows(keys).tolist() == [False, False, True, True, True, False, True, True]


def _setup_trainer(trainer_config, monkeypatch, overrides=None, seed=3, keys_fn=None, worker_cls=None, entropy_fn=None):
    """A heal_sync trainer over the in-memory TransferQueue with B = 16 trajectories already rolled out."""
    import transfer_queue
    from omegaconf import OmegaConf, open_dict

    from heal.integrations.verl.trainer import HealPPOTrainerSync
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    tq = _MemoryTQ()
    monkeypatch.setattr(transfer_queue, "kv_batch_get", tq.kv_batch_get)
    monkeypatch.setattr(transfer_queue, "kv_batch_put", tq.kv_batch_put)
    entropy, mask, scores, acc, lengths, uids, sources = _trajectories(n_prompts=4, n=4, seed=seed)
    if entropy_fn is not None:
        entropy = entropy_fn(entropy)
    B = entropy.shape[0]
    keys = keys_fn(uids) if keys_fn else [f"{uids[i]}_{i % 4}_0" for i in range(B)]
    g = torch.Generator().manual_seed(11)
    prompt_lens = torch.randint(3, 9, (B,), generator=g)
    fields, full_entropy, full_lp = [], [], []
    for i in range(B):
        L, P = int(lengths[i]), int(prompt_lens[i])
        fields.append({"response_mask": mask[i, :L].clone(), "rm_scores": scores[i, :L].clone(),
                       "responses": torch.ones(L, dtype=torch.long), "rollout_log_probs": -torch.rand(L, generator=g),
                       "uid": uids[i], "data_source": sources[i]})
        full_entropy.append(torch.cat([torch.full((P - 1,), 9.0), entropy[i, :L], torch.full((1,), 9.0)]))
        full_lp.append(-torch.rand(P + L, generator=g))
    tq.kv_batch_put(keys, "train", fields=list_of_dict_to_tensordict(fields))
    config = OmegaConf.create(OmegaConf.to_container(trainer_config))
    with open_dict(config):
        for k, v in (overrides or {}).items():
            OmegaConf.update(config, k, v, force_add=True)
    trainer = HealPPOTrainerSync(config)
    trainer.global_steps = 1
    trainer.timing_raw = {}
    trainer.actor_rollout_wg = (worker_cls or _FakeActorWorkerGroup)(tq, full_entropy, full_lp)
    from transfer_queue import KVBatchMeta

    batch = KVBatchMeta(partition_id="train", keys=keys, tags=[{} for _ in keys])
    return trainer, tq, batch, keys, (entropy, mask, scores, acc, lengths, uids, sources)


HIGH_ENTROPY_OVERRIDES = {
    "actor_rollout_ref.actor.policy_loss._target_": "heal.integrations.verl.losses.HealPolicyLossConfig",
    "actor_rollout_ref.actor.policy_loss.loss_mode": "high_entropy_tokens",
    "actor_rollout_ref.actor.policy_loss.high_entropy_ratio": 0.2,
    "actor_rollout_ref.actor.calculate_entropy": True,
}


def _calm_first_half(entropy):
    """Rows 0-7 (the target prompts of the first micro-batch) at a quarter of the entropy of rows 8-15."""
    out = entropy.clone()
    out[:8] *= 0.25
    return out


def test_batch_high_entropy_mask_through_the_transfer_queue_to_verls_ppo_loss(trainer_config, monkeypatch):
    """The driver's batch-level top-20% mask lands in the TransferQueue; verl's ppo_loss on each micro-batch
    (rows fetched as the worker fetches them) uses it. Probe: micro-batch 1 is calm, micro-batch 2 is not;
    the batch rule takes (almost) nothing from the first, the per-micro-batch rule 20% of each."""
    from heal.integrations.verl import losses as heal_losses
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils import losses as verl_losses

    trainer, tq, batch, keys, (entropy, mask, *_rest) = _setup_trainer(
        trainer_config, monkeypatch, dict(HIGH_ENTROPY_OVERRIDES, **{"heal.enable": False}), entropy_fn=_calm_first_half)
    assert trainer._heal_batch_mask and not trainer.heal_settings.enable
    assert trainer.config.actor_rollout_ref.actor.policy_loss.high_entropy_scope == "batch"
    metrics = {}
    batch = trainer._compute_old_log_prob(batch, metrics)
    trainer._compute_advantage(batch, metrics)

    # the driver's mask = the top 20% of the whole batch's valid tokens
    want, threshold = heal_losses.top_entropy_mask(entropy, mask, 0.2)
    got = [tq.rows[("train", k)][heal_losses.HIGH_ENTROPY_MASK_KEY] for k in keys]
    for i, row in enumerate(got):
        L = row.numel()
        assert torch.equal(row.bool(), want[i, :L]), i
    total = int(want.sum())
    assert metrics["heal/high_entropy_selected"] == total and metrics["heal/high_entropy_threshold"] == pytest.approx(threshold)
    assert "eda/rate_target" not in metrics  # heal.enable=false: no EDA reward

    # two micro-batches the way the worker feeds verl's ppo_loss (nested rows from the TQ)
    nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    cfg = _loss_config(high_entropy_scope="batch")
    selected_batch, selected_micro = [], []
    for rows in (list(range(0, 8)), list(range(8, 16))):
        r = [tq.rows[("train", keys[i])] for i in rows]
        lens = [x["response_mask"].numel() for x in r]
        data = TensorDict({
            "prompts": nested([torch.ones(2, dtype=torch.long) for _ in rows]),
            "responses": nested([torch.ones(n, dtype=torch.long) for n in lens]),
            "response_mask": nested([x["response_mask"] for x in r]),
            "old_log_probs": nested([x["old_log_probs"] for x in r]),
            "advantages": nested([x["advantages"] for x in r]),
            heal_losses.HIGH_ENTROPY_MASK_KEY: nested([x[heal_losses.HIGH_ENTROPY_MASK_KEY] for x in r]),
            heal_losses.HIGH_ENTROPY_TOTAL_KEY: torch.stack([torch.as_tensor(x[heal_losses.HIGH_ENTROPY_TOTAL_KEY]) for x in r]),
        }, batch_size=len(rows))
        for k, v in {"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": 16}.items():
            tu.assign_non_tensor_data(data, k, v)
        ent = [torch.cat([torch.zeros(1), entropy[i, :n], torch.zeros(1)]) for i, n in zip(rows, lens)]
        lp = [torch.cat([torch.zeros(1), x["old_log_probs"], torch.zeros(1)]) for x in r]
        model_output = {"log_probs": nested(lp), "entropy": nested(ent)}  # on-policy: log_prob = old_log_prob
        _, m = verl_losses.ppo_loss(cfg, model_output, data)
        frac = float(m["actor/high_entropy_frac"].values[0] if hasattr(m["actor/high_entropy_frac"], "values") else m["actor/high_entropy_frac"])
        selected_batch.append(round(frac * sum(lens)))
        micro_mask, _ = heal_losses.top_entropy_mask(entropy[rows], mask[rows], 0.2)
        selected_micro.append(int(micro_mask.sum()))
    assert selected_batch == [int(want[:8].sum()), int(want[8:].sum())] and sum(selected_batch) == total
    assert selected_batch[0] < selected_micro[0] and selected_batch[1] > selected_micro[1]
    n_valid = [int(mask[:8].sum()), int(mask[8:].sum())]
    assert selected_micro == [math.ceil(0.2 * n - 1e-9) for n in n_valid]  # forced 20% of each
    print(f"valid tokens per micro-batch {n_valid}; selected: batch rule {selected_batch}, "
          f"micro-batch rule {selected_micro}")


def _loss_config(**policy):
    from verl.workers.config import ActorConfig

    from heal.integrations.verl.losses import HealPolicyLossConfig

    return ActorConfig(strategy="fsdp", rollout_n=4, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2,
                       use_kl_loss=False, entropy_coeff=0,
                       policy_loss=HealPolicyLossConfig(loss_mode="high_entropy_tokens", **policy))


def test_batch_scope_without_a_shipped_mask_fails_clearly():
    from heal.integrations.verl.losses import compute_policy_loss_high_entropy_tokens

    old = -torch.rand(2, 5)
    with pytest.raises(RuntimeError, match="heal_sync"):
        compute_policy_loss_high_entropy_tokens(old, old, torch.ones(2, 5), torch.ones(2, 5, dtype=torch.bool),
                                                "token-mean", _loss_config(high_entropy_scope="batch"), None,
                                                entropy=torch.rand(2, 5))


def test_batch_scope_normaliser_is_the_batch_count():
    """token-mean with the shipped mask: sum of the selected token losses / the batch's selected count."""
    from heal.integrations.verl.losses import compute_policy_loss_high_entropy_tokens

    g = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 6, generator=g)
    new = old + 0.1 * torch.randn(3, 6, generator=g)
    adv = torch.randn(3, 1, generator=g).expand(3, 6)
    valid = torch.ones(3, 6, dtype=torch.bool)
    sel = torch.rand(3, 6, generator=g) < 0.3
    cfg = _loss_config(high_entropy_scope="batch")
    cfg.global_batch_info.update({"dp_size": 1, "batch_num_tokens": 100, "global_batch_size": 8})
    loss, m = compute_policy_loss_high_entropy_tokens(old, new, adv, valid, "token-mean", cfg, None,
                                                      high_entropy_mask=sel, high_entropy_total=25)
    ratio = torch.exp(new - old)
    tok = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    tok = torch.where(adv < 0, torch.minimum(tok, -adv * 3.0), tok)
    assert float(loss) == pytest.approx(float(tok[sel].sum()) / 25, rel=1e-6)
    assert m["actor/high_entropy_frac"] == pytest.approx(int(sel.sum()) / 18)


def test_multi_turn_only_final_outputs_are_compared_and_rewarded(trainer_config, monkeypatch):
    """Rows 0-1 and 4-6 are earlier turns of the conversations ending in rows 2 and 7."""
    turn = {0: ("p0", 0, 0), 1: ("p0", 0, 1), 2: ("p0", 0, 2), 4: ("p1", 0, 0), 5: ("p1", 0, 1), 6: ("p1", 0, 2), 7: ("p1", 0, 3)}

    def keys_fn(uids):
        return [("{}_{}_{}".format(*turn[i]) if i in turn else f"{uids[i]}_{i % 4 + 1}_0") for i in range(len(uids))]

    trainer, tq, batch, keys, (entropy, mask, scores, acc, lengths, uids, sources) = _setup_trainer(
        trainer_config, monkeypatch, keys_fn=keys_fn)
    metrics = {}
    batch = trainer._compute_old_log_prob(batch, metrics)
    trainer._compute_advantage(batch, metrics)
    final = [i not in (0, 1, 4, 5, 6) for i in range(len(keys))]
    idx = [i for i in range(len(keys)) if final[i]]
    result, _ = eda_step(entropy[idx], mask[idx], [sources[i] for i in idx], [uids[i] for i in idx], trainer.heal_settings.eda)
    got = torch.stack([torch.as_tensor(tq.rows[("train", k)]["eda_reward"]) for k in keys])
    assert torch.equal(got[idx], result.reward)
    assert got[[0, 1, 4, 5, 6]].tolist() == [0.0] * 5
    for i in (0, 1, 4, 5, 6):  # earlier turns keep their scores
        assert torch.equal(tq.rows[("train", keys[i])]["rm_scores"], scores[i, : int(lengths[i])])
    assert metrics["heal/eda_rows"] == len(idx) and metrics["heal/non_final_rows"] == 5


class _TemperatureWorkerGroup(_FakeActorWorkerGroup):
    """Answers compute_log_prob with entropies that depend on the requested temperature."""

    def __init__(self, *a):
        super().__init__(*a)
        self.calls = []

    def compute_log_prob(self, batch):
        t = float(batch.extra_info["temperature"])
        self.calls.append(dict(batch.extra_info))
        base = self.full_entropy
        self.full_entropy = [e * t for e in base]  # a different curve at each temperature
        try:
            return super().compute_log_prob(batch)
        finally:
            self.full_entropy = base


def test_entropy_temperature_one_takes_one_more_pass_and_keeps_the_update_entropy(trainer_config, monkeypatch, tmp_path):
    dump = str(tmp_path / "r.jsonl")
    trainer, tq, batch, keys, (entropy, mask, *_r, uids, sources) = _setup_trainer(
        trainer_config, monkeypatch, {"heal.entropy_temperature": 1.0, "heal.rollout_dump": dump},
        worker_cls=_TemperatureWorkerGroup)
    metrics = {}
    batch = trainer._compute_old_log_prob(batch, metrics)
    wg = trainer.actor_rollout_wg
    assert [c["temperature"] for c in wg.calls] == [0.7, 1.0] and all(c["calculate_entropy"] for c in wg.calls)
    for i, k in enumerate(keys):
        L = tq.rows[("train", k)]["response_mask"].numel()
        torch.testing.assert_close(tq.rows[("train", k)]["entropy"], entropy[i, :L] * 0.7)  # update's entropies kept
        torch.testing.assert_close(tq.rows[("train", k)]["heal_eda_entropy"], entropy[i, :L] * 1.0)
    trainer._compute_advantage(batch, metrics)
    result, _ = eda_step(entropy, mask, sources, uids, trainer.heal_settings.eda)  # the T=1 curves
    got = torch.stack([torch.as_tensor(tq.rows[("train", k)]["eda_reward"]) for k in keys])
    assert torch.equal(got, result.reward)
    assert metrics["heal/entropy_temperature"] == 1.0 and "heal_entropy_t1" in trainer.timing_raw
    from heal.analysis.logs import load_rollout_dump

    assert {r["entropy_temperature"] for r in load_rollout_dump(dump)} == {1.0}


def test_entropy_temperature_rollout_is_the_default_and_costs_nothing(trainer_config, monkeypatch):
    trainer, tq, batch, keys, _ = _setup_trainer(trainer_config, monkeypatch, worker_cls=_TemperatureWorkerGroup)
    metrics = {}
    trainer._compute_advantage(trainer._compute_old_log_prob(batch, metrics), metrics)
    assert [c["temperature"] for c in trainer.actor_rollout_wg.calls] == [0.7]
    assert metrics["heal/entropy_temperature"] == 0.7


def test_batch_scope_startup_checks_name_the_keys(trainer_config):
    from omegaconf import OmegaConf, open_dict

    from heal.integrations.verl.settings import check_on_policy

    cfg = OmegaConf.create(OmegaConf.to_container(trainer_config))
    with open_dict(cfg):
        for k, v in HIGH_ENTROPY_OVERRIDES.items():
            OmegaConf.update(cfg, k, v, force_add=True)
        cfg.heal.enable = False
    s = HealSettings.from_config(cfg)
    assert s.batch_high_entropy_mask(cfg)
    check_on_policy(cfg)  # batch 4 = mini-batch 4, one epoch
    bad = OmegaConf.create(OmegaConf.to_container(cfg))
    with open_dict(bad):
        bad.algorithm.rollout_correction = {"bypass_mode": True}
    with pytest.raises(ValueError, match=r"bypass_mode.*high_entropy_scope"):
        HealSettings.from_config(bad)
    bad = OmegaConf.create(OmegaConf.to_container(cfg))
    bad.actor_rollout_ref.actor.ppo_mini_batch_size = 2
    bad.actor_rollout_ref.actor.ppo_epochs = 3
    with pytest.raises(ValueError, match=r"ppo_mini_batch_size=2 < data\.train_batch_size=4 and .*ppo_epochs=3 > 1"):
        HealSettings.from_config(bad)
    bad.heal.high_entropy_scope = "micro_batch"
    assert not HealSettings.from_config(bad).batch_high_entropy_mask(bad)
    bad.actor_rollout_ref.actor.policy_loss.loss_mode = "vanilla"  # other losses: the key does nothing
    bad.heal.high_entropy_scope = "batch"
    assert not HealSettings.from_config(bad).batch_high_entropy_mask(bad)
