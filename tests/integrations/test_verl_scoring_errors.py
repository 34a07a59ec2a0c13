"""Scoring errors under verl: the presets' reward function returns each response's ``scoring_error``,
verl 0.9 carries it to the trainer, and ``heal_sync`` logs it as ``scoring/errors/<reason>``.

verl 0.9's v1 trainer keeps the reward function's extra keys in one of two places:

* reward computed during the rollout (verl's default; the presets: no reward model): the agent loop
  worker asks a reward loop worker (``AgentLoopWorker._compute_score``), stores the answer's
  ``reward_extra_info`` in the output's ``extra_fields`` and writes the row to the TransferQueue
  (``AgentLoopWorkerTQ._agent_loop_postprocess``) before the trainer samples it;
* reward computed by the trainer (a reward model without its own resource pool): the trainer writes
  each extra key as its own TransferQueue field (``PPOTrainer._compute_reward_colocate``, step 2 of
  ``_step_once``), before ``_compute_advantage`` (step 7).

Both are driven here through verl's own code, without Ray: the TransferQueue is an in-memory stand-in
(the real one needs a Ray cluster), the reward loop worker is called in-process.
"""

import asyncio
import glob
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest

verl = pytest.importorskip("verl")

import torch  # noqa: E402
from omegaconf import OmegaConf, open_dict  # noqa: E402

from heal import scoring  # noqa: E402
from heal.integrations.verl.config_dir import CONFIG_NAMES, config_dir  # noqa: E402
from heal.integrations.verl.trainer import SCORING_ERROR_KEY, scoring_error_metrics  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REASONS = ["", "code/RecursionError", "math/ValueError", "", "code/RecursionError"]
WANT = {"scoring/errors/code/RecursionError": 2.0, "scoring/errors/math/ValueError": 1.0}


# ------------------------------------------------------------------------------------------
# the metric, from a batch's columns
# ------------------------------------------------------------------------------------------


def test_metrics_from_a_scoring_error_column():
    from verl.protocol import DataProto
    from verl.utils.tensordict_utils import get_tensordict

    data = DataProto.from_dict(tensors={"x": torch.zeros(len(REASONS), 1)},
                               non_tensors={SCORING_ERROR_KEY: np.array(REASONS, dtype=object)})
    assert scoring_error_metrics(data.non_tensor_batch) == WANT
    # as the TransferQueue returns it (verl writes the column with tu.get_tensordict)
    assert scoring_error_metrics(get_tensordict({SCORING_ERROR_KEY: np.array(REASONS)})) == WANT
    # rows left out are not counted
    assert scoring_error_metrics(data.non_tensor_batch, [True, True, False, True, False]) == {
        "scoring/errors/code/RecursionError": 1.0}
    assert scoring_error_metrics({SCORING_ERROR_KEY: ["", ""]}) == {}  # all judged
    with pytest.raises(ValueError, match="scoring_error"):
        scoring_error_metrics(data.non_tensor_batch, [True, False])


def test_metrics_from_reward_extra_info_in_extra_fields():
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    rows = [{"extra_fields": {"reward_extra_info": {"score": 0.0, "acc": 0.0, SCORING_ERROR_KEY: r}}} for r in REASONS]
    assert scoring_error_metrics(list_of_dict_to_tensordict(rows)) == WANT
    # a reward function without the key (compute_score), or rows without reward info: nothing
    assert scoring_error_metrics({"extra_fields": [{"reward_extra_info": {"acc": 1.0}}, {}, None]}) == {}


def test_absent_column_gives_no_metrics():
    from tensordict import TensorDict

    assert scoring_error_metrics({}) == {}
    assert scoring_error_metrics({"data_source": np.array(["a", "b"], dtype=object)}) == {}
    assert scoring_error_metrics(TensorDict({}, batch_size=0)) == {}  # what TransferQueue returns for no fields


# ------------------------------------------------------------------------------------------
# the presets
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def presets():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        return {name: compose(config_name=name, overrides=["actor_rollout_ref.model.path=/nonexistent"])
                for name in CONFIG_NAMES}


def test_presets_name_compute_score_with_info(presets):
    from verl.experimental.reward_loop.reward_loop import RewardLoopManager
    from verl.utils.import_utils import load_extern_object

    named = [n for n, c in presets.items() if c.reward.custom_reward_function.path is not None]
    assert set(CONFIG_NAMES) - set(named) == {"heal_trainer"}  # verl's own config: the user names the function
    for name in named:
        fn_cfg = presets[name].reward.custom_reward_function
        assert (fn_cfg.path, fn_cfg.name) == ("pkg://heal.scoring", "compute_score_with_info"), name
        fn = load_extern_object(fn_cfg.path, fn_cfg.name)  # how verl loads it
        assert fn is scoring.compute_score_with_info
        assert fn("commonsense_qa", "Answer: B", "B") == {"score": 1.0, "acc": 1.0, SCORING_ERROR_KEY: ""}
        # no reward model: verl scores during the rollout (reward_extra_info -> extra_fields)
        stub = SimpleNamespace(config=presets[name], reward_loop_workers=["worker"])
        assert RewardLoopManager.reward_loop_worker_handles.fget(stub) == ["worker"], name
    # nothing in the configs or the recipes still names the plain function
    files = glob.glob(os.path.join(config_dir(), "*.yaml")) + glob.glob(os.path.join(REPO, "recipes", "verl", "*"))
    for path in files:
        text = open(path).read()
        assert not re.search(r"(name[:=]\s*|custom_reward_function\.name=)compute_score\b(?!_)", text), path


# ------------------------------------------------------------------------------------------
# through verl's own code into heal_sync's _compute_advantage
# ------------------------------------------------------------------------------------------


class _MemoryTQ:
    """TransferQueue's kv_batch_get / kv_batch_put / async_kv_batch_put in memory; like the real one,
    fields it does not hold are left out of what kv_batch_get returns."""

    def __init__(self):
        self.rows = {}

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        from transfer_queue import KVBatchMeta

        for i, key in enumerate(keys):
            row = self.rows.setdefault((partition_id, key), {})
            for name in (fields.keys() if fields is not None else ()):
                value = fields[name]
                if isinstance(value, torch.Tensor):
                    row[name] = value.unbind()[i] if value.is_nested else value[i]
                else:
                    row[name] = value.tolist()[i] if hasattr(value, "tolist") else list(value)[i]
        return KVBatchMeta(partition_id=partition_id, keys=list(keys), tags=list(tags) if tags else [{} for _ in keys])

    async def async_kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        return self.kv_batch_put(keys, partition_id, fields=fields, tags=tags)

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        from verl.utils.tensordict_utils import list_of_dict_to_tensordict

        rows = [self.rows[(partition_id, k)] for k in keys]
        names = [f for f in (select_fields or rows[0]) if all(f in r for r in rows)]
        return list_of_dict_to_tensordict([{f: r[f] for f in names} for r in rows])


class _ByteTokenizer:
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) for i in ids).decode()


def _fragile_checkers(monkeypatch):
    """code raises RecursionError on every response; math raises ValueError on "bad"."""

    def code(solution, ground_truth, extra_info=None):
        raise RecursionError("maximum recursion depth exceeded")

    def math(solution, ground_truth, extra_info=None):
        if solution == "bad":
            raise ValueError("unparsable")
        return float(solution == ground_truth)

    monkeypatch.setitem(scoring.CHECKERS, "code", code)
    monkeypatch.setitem(scoring.CHECKERS, "math", math)


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    loop.close()


def _trainer(preset, tq, monkeypatch):
    import transfer_queue

    from heal.integrations.verl.trainer import HealPPOTrainerSync

    monkeypatch.setattr(transfer_queue, "kv_batch_get", tq.kv_batch_get)
    monkeypatch.setattr(transfer_queue, "kv_batch_put", tq.kv_batch_put)
    config = OmegaConf.create(OmegaConf.to_container(preset))
    with open_dict(config):
        config.heal.enable = False  # the EDA needs the old-log-prob pass; the metric does not
    trainer = HealPPOTrainerSync(config)
    trainer.timing_raw = {}
    return trainer


def test_reward_loop_extra_info_reaches_compute_advantage(presets, monkeypatch, loop):
    """verl's default path: the preset's reward function in verl's reward manager, the agent loop worker
    storing its answer, verl's batch padding, then heal_sync's _compute_advantage and verl's GRPO."""
    from transfer_queue import KVBatchMeta

    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.trainer.ppo import padding_utils
    from verl.trainer.ppo.reward import load_reward_manager
    from verl.trainer.ppo.v1 import agent_loop_tq
    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopWorkerTQ

    _fragile_checkers(monkeypatch)
    preset = presets["paper_heal"]
    tq = _MemoryTQ()
    monkeypatch.setattr(agent_loop_tq, "tq", tq)
    monkeypatch.setattr(padding_utils, "tq", tq)

    # verl's reward loop worker (in this process instead of a Ray actor) with the preset's reward manager
    reward_worker = object.__new__(RewardLoopWorker)
    reward_worker.config = preset
    reward_worker.reward_manager = load_reward_manager(preset, _ByteTokenizer())

    class _Handle:  # stands in for the Ray actor handle: handle.compute_score.remote(data)
        compute_score = SimpleNamespace(remote=reward_worker.compute_score)

    worker = object.__new__(AgentLoopWorkerTQ.__ray_metadata__.modified_class)
    worker.reward_loop_worker_handles = [_Handle()]
    worker.processor, worker.mm_processor_kwargs, worker.distillation_enabled = None, None, False

    def output(text):
        return AgentLoopOutput(prompt_ids=[1, 2, 3], response_ids=list(text.encode()),
                               response_mask=[1] * len(text.encode()), num_turns=2, metrics=AgentLoopMetrics())

    # (data_source, ground truth, responses of a conversation): rows p0 (math), p1 (code), p2 (choice)
    conversations = [
        ("p0", 0, "deepscaler", "42", ["42"]),
        ("p0", 1, "deepscaler", "42", ["bad"]),                        # math/ValueError
        ("p1", 0, "livecodebench", "[]", ["first turn", "print(1)"]),  # code/RecursionError, 2 outputs
        ("p1", 1, "livecodebench", "[]", ["print(2)"]),                # code/RecursionError
        ("p2", 0, "commonsense_qa", "B", ["Answer: B"]),
        ("p2", 1, "commonsense_qa", "B", ["Answer: C"]),
    ]
    for uid, session, source, gt, texts in conversations:
        kwargs = {"uid": uid, "session_id": session, "data_source": source, "global_steps": 1,
                  "reward_model": {"style": "rule", "ground_truth": gt}, "extra_info": {}}
        outs = [output(t) for t in texts]
        loop.run_until_complete(worker._agent_loop_postprocess(outs if len(outs) > 1 else outs[0], False, **kwargs))

    keys = [k for (_, k) in tq.rows]
    assert len(keys) == 7 and "p1_0_0" in keys and "p1_0_1" in keys
    # where verl keeps the reason: the row's extra_fields, under reward_extra_info
    assert tq.rows[("train", "p0_1_0")]["extra_fields"]["reward_extra_info"][SCORING_ERROR_KEY] == "math/ValueError"
    # the earlier output of a conversation carries a copy of the final output's reward info
    assert tq.rows[("train", "p1_0_0")]["extra_fields"]["reward_extra_info"][SCORING_ERROR_KEY] == "code/RecursionError"
    assert [float(tq.rows[("train", k)]["rm_scores"][-1]) for k in ("p0_0_0", "p2_0_0", "p2_1_0")] == [1.0, 1.0, 0.0]

    # verl pads the batch with copies of its first row (reward info included: p1_0_0 leads here)
    batch = KVBatchMeta(partition_id="train", keys=sorted(keys, key=lambda k: not k.startswith("p1_0")),
                        tags=[{} for _ in keys])
    batch = padding_utils.upsample_batch_to_divisible_size(batch, batch_multiple=4, eos_token_id=0)
    assert len(batch) == 8 and batch.tags[-1]["is_padding"]

    trainer = _trainer(preset, tq, monkeypatch)
    metrics = {}
    trainer._compute_advantage(batch, metrics)
    # one per judged-or-not response: the copy on p1_0_0 and the padding row are not counted
    assert {k: v for k, v in metrics.items() if k.startswith("scoring/")} == {
        "scoring/errors/code/RecursionError": 2.0, "scoring/errors/math/ValueError": 1.0}
    assert "advantages" in tq.rows[("train", "p2_0_0")]  # verl's GRPO ran after it


def test_colocated_reward_columns_reach_compute_advantage(presets, monkeypatch):
    """A reward model without its own pool: verl's trainer writes the extra keys as TransferQueue fields."""
    from transfer_queue import KVBatchMeta

    from verl.protocol import DataProto
    from verl.trainer.ppo.v1 import trainer_base
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    tq = _MemoryTQ()
    monkeypatch.setattr(trainer_base, "tq", tq)
    keys = [f"p{i // 2}_{i % 2}_0" for i in range(len(REASONS) + 1)]
    reasons = REASONS + [""]
    lengths = [2 + i % 3 for i in range(len(keys))]  # ragged, as verl stores them (nested tensors)
    tq.kv_batch_put(keys, "train", fields=list_of_dict_to_tensordict([
        {"prompts": torch.tensor([1, 2, 3][: 1 + i % 3]), "responses": torch.full((n,), 5),
         "raw_prompt": [{"role": "user"}], "uid": k.split("_")[0], "response_mask": torch.ones(n, dtype=torch.long)}
        for i, (k, n) in enumerate(zip(keys, lengths))]))

    class _RewardLoopManager:  # the answer of verl's RewardLoopManager.compute_rm_score
        reward_loop_worker_handles = None

        def compute_rm_score(self, data):
            return DataProto.from_dict(
                tensors={"rm_scores": torch.zeros(len(data), max(lengths))},
                non_tensors={"acc": np.zeros(len(data)), SCORING_ERROR_KEY: np.array(reasons)},
                meta_info={"reward_extra_keys": ["acc", SCORING_ERROR_KEY]})

    trainer = _trainer(presets["paper_heal"], tq, monkeypatch)
    trainer.reward_loop_manager, trainer.tokenizer = _RewardLoopManager(), _ByteTokenizer()
    batch = KVBatchMeta(partition_id="train", keys=keys, tags=[{} for _ in keys])
    trainer._compute_reward_colocate(batch, metrics={})  # verl's own step 2
    assert tq.rows[("train", keys[1])][SCORING_ERROR_KEY] == "code/RecursionError"
    metrics = {}
    trainer._compute_advantage(batch, metrics)
    assert {k: v for k, v in metrics.items() if k.startswith("scoring/")} == WANT


def test_no_scoring_error_anywhere_adds_nothing(presets, monkeypatch):
    """compute_score (a float): verl's reward info has only ``acc``; no metric, no error."""
    from transfer_queue import KVBatchMeta

    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    tq = _MemoryTQ()
    keys = [f"p{i // 2}_{i % 2}_0" for i in range(4)]
    tq.kv_batch_put(keys, "train", fields=list_of_dict_to_tensordict([
        {"uid": k.split("_")[0], "response_mask": torch.ones(2 + i, dtype=torch.long), "rm_scores": torch.zeros(2 + i),
         "extra_fields": {"reward_extra_info": {"acc": 0.0}}} for i, k in enumerate(keys)]))
    trainer = _trainer(presets["paper_heal"], tq, monkeypatch)
    metrics = {}
    trainer._compute_advantage(KVBatchMeta(partition_id="train", keys=keys, tags=[{} for _ in keys]), metrics)
    assert not [k for k in metrics if k.startswith("scoring/")]
