"""heal.reward.eda_reward / combine_rewards / add_to_last_token: every rule of DESIGN.md section 4.

Hand-built batches whose answers are known, plus fresh random batches checked against a literal
float64 re-implementation of the reference loop (one ``heal_kernels.reference`` similarity per pair).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import heal
from heal.dynamics import pack_sequences
from heal.reward import EDAResult, add_to_last_token, combine_rewards, eda_reward
from heal_kernels import reference as ref

NEG_INF = -math.inf


def _literal_eda(seqs, is_general, *, prompt_ids=None, min_length=50, general_reward="mirror",
                 metric="kl", kl_direction="scored_first"):
    """The reference loop, literally: float64 maxima per group, then the decision rules.

    Returns (reward, s_target, s_general, margin), margin = the gap the decision depends on.
    """
    bsz = len(seqs)
    s_t = [NEG_INF] * bsz
    s_g = [NEG_INF] * bsz
    for i in range(bsz):
        if len(seqs[i]) == 0:
            continue
        for j in range(bsz):
            if j == i or len(seqs[j]) == 0:
                continue
            if prompt_ids is not None and prompt_ids[i] == prompt_ids[j]:
                continue
            s = ref.pair_similarity(torch.as_tensor(seqs[i]), torch.as_tensor(seqs[j]), metric, kl_direction)
            if is_general[j]:
                s_g[i] = max(s_g[i], s)
            else:
                s_t[i] = max(s_t[i], s)
    reward, margin = [], []
    for i in range(bsz):
        if is_general[i]:
            r = general_reward == "mirror" and s_t[i] > NEG_INF and s_t[i] >= s_g[i]
        else:
            r = s_g[i] > s_t[i]
        if len(seqs[i]) <= min_length:
            r = False
            m = math.inf  # decided by length alone
        elif math.isinf(s_t[i]) or math.isinf(s_g[i]):
            m = math.inf
        else:
            m = abs(s_g[i] - s_t[i])
        reward.append(float(r))
        margin.append(m)
    return reward, s_t, s_g, margin


def _run(seqs, is_general, device="cpu", **kw):
    values, cu = pack_sequences([torch.as_tensor(s, dtype=torch.float32, device=device) for s in seqs])
    if "prompt_ids" in kw and kw["prompt_ids"] is not None:
        kw["prompt_ids"] = kw["prompt_ids"].to(device)
    return eda_reward(values, cu, torch.tensor(is_general, dtype=torch.bool, device=device), **kw)


def _ramp(n, lo=0.0, hi=3.0):
    return torch.linspace(lo, hi, n)


def test_exported_from_heal():
    assert heal.eda_reward is eda_reward and heal.EDAResult is EDAResult and heal.combine_rewards is combine_rewards


def test_strict_target_rule_and_general_tie():
    a = _ramp(60)  # target A
    g = a.clone()  # general identical to A -> s(A, G) = 0, the largest possible kl similarity
    b = _ramp(60, 3.0, 0.0)  # target B, decreasing: unlike both
    res = _run([a, b, g], [False, False, True], min_length=10)
    assert res.is_general.tolist() == [False, False, True]
    # A: S_inter = s(A, G) = 0 > S_intra = s(A, B) -> 1
    assert res.s_general[0].item() == pytest.approx(0.0, abs=1e-6) and res.s_target[0] < -1e-3
    # B: S_inter = s(B, G) == s(B, A) = S_intra exactly (G is A) -> tie -> 0 for a target
    assert res.s_general[1].item() == res.s_target[1].item()
    # G: max over targets = s(G, A) = 0; no other general -> -inf -> 1
    assert res.s_general[2].item() == NEG_INF
    assert res.reward.tolist() == [1.0, 0.0, 1.0]
    assert res.reward.dtype == torch.float32 and res.s_target.dtype == torch.float32


def test_general_tie_gives_one():
    a = _ramp(60)
    res = _run([a, a.clone(), a.clone()], [False, True, True], min_length=10)
    # every similarity is 0: the target's S_inter == S_intra? it has no other target: -inf -> 1
    assert res.s_target[0].item() == NEG_INF and res.reward[0].item() == 1.0
    # generals: s_target = s_general = 0 -> tie -> 1
    assert res.s_target[1].item() == res.s_general[1].item() == pytest.approx(0.0, abs=1e-6)
    assert res.reward[1:].tolist() == [1.0, 1.0]


def test_general_reward_none():
    a = _ramp(60)
    res = _run([a, a.clone(), a.clone()], [False, True, True], min_length=10, general_reward="none")
    assert res.reward.tolist() == [1.0, 0.0, 0.0]


def test_no_general_in_batch_gives_zero():
    seqs = [_ramp(60 + 5 * i, 0, 1 + i) for i in range(4)]
    res = _run(seqs, [False] * 4, min_length=10)
    assert res.reward.tolist() == [0.0] * 4
    assert torch.isinf(res.s_general).all() and torch.isfinite(res.s_target).all()


def test_no_target_in_batch_gives_zero():
    seqs = [_ramp(60 + 5 * i, 0, 1 + i) for i in range(3)]
    res = _run(seqs, [True] * 3, min_length=10)
    assert res.reward.tolist() == [0.0] * 3
    assert torch.isinf(res.s_target).all()


def test_lone_target_with_one_general_and_single_trajectories():
    # target with no other target and one general: S_intra = -inf, S_inter finite -> 1
    res = _run([_ramp(60), _ramp(70, 2, 0)], [False, True], min_length=10)
    assert res.s_target[0].item() == NEG_INF and math.isfinite(res.s_general[0].item())
    assert res.reward.tolist() == [1.0, 1.0]
    # B = 1: no neighbour at all, both -inf -> 0
    res = _run([_ramp(60)], [False], min_length=10)
    assert res.reward.tolist() == [0.0] and res.s_target.item() == res.s_general.item() == NEG_INF
    res = _run([_ramp(60)], [True], min_length=10)
    assert res.reward.tolist() == [0.0]


def test_short_trajectories_get_zero_but_stay_neighbours():
    a = _ramp(60)
    short_g = a[::6].clone()  # 10 tokens, general: the only general neighbour of A
    b = _ramp(60, 3.0, 0.0)
    res = _run([a, b, short_g], [False, False, True], min_length=10)
    # the short general is A's S_inter neighbour ...
    expect = ref.kl_similarity(a.double(), short_g.double())
    assert res.s_general[0].item() == pytest.approx(expect, rel=1e-5, abs=1e-7)
    assert res.reward[0].item() == 1.0
    # ... but gets no reward itself although the mirrored rule would give it 1
    assert res.s_target[2] >= res.s_general[2]
    assert res.reward[2].item() == 0.0
    # exactly min_length tokens -> 0; min_length + 1 -> eligible
    assert _run([a, b, short_g], [False, False, True], min_length=60).reward[0].item() == 0.0
    assert _run([a, b, short_g], [False, False, True], min_length=59).reward[0].item() == 1.0
    assert _run([a, b, short_g], [False, False, True], min_length=9).reward[2].item() == 1.0


def test_empty_responses():
    a = _ramp(60)
    g = a.clone()
    empty = torch.zeros(0)
    res = _run([empty, a, empty, g, empty], [False, False, True, True, False], min_length=0)
    assert res.reward.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    for i in (0, 2, 4):  # an empty row has no similarity to anything
        assert res.s_target[i].item() == res.s_general[i].item() == NEG_INF
    # empty rows are not neighbours: the target's only other target is empty -> S_intra = -inf
    assert res.s_target[1].item() == NEG_INF
    # all empty, and B = 0
    assert _run([empty, empty], [False, True]).reward.tolist() == [0.0, 0.0]
    res = _run([], [])
    assert res.reward.shape == (0,) and res.s_target.shape == (0,) and res.is_general.shape == (0,)


def test_prompt_ids_exclusion():
    a = _ramp(60)
    g_same = a.clone()  # identical general from A's own prompt
    g_far = _ramp(60, 3.0, 0.0)
    t_other = _ramp(60, 0.0, 2.5)  # another target, close to A
    seqs = [a, t_other, g_same, g_far]
    is_general = [False, False, True, True]
    plain = _run(seqs, is_general, min_length=10)
    assert plain.reward[0].item() == 1.0  # g_same is A's best neighbour
    pids = [7, 8, 7, 9]
    excl = _run(seqs, is_general, min_length=10, prompt_ids=torch.tensor(pids))
    lit = _literal_eda(seqs, is_general, prompt_ids=pids, min_length=10)
    assert excl.reward.tolist() == lit[0]
    assert excl.reward[0].item() == 0.0  # only g_far is left as A's general neighbour
    assert excl.s_general[0].item() == pytest.approx(lit[2][0], rel=1e-5)


@pytest.mark.parametrize("metric", ["hti", "pl"])
def test_other_metrics_are_plumbed(metric):
    g = torch.Generator().manual_seed(3)
    seqs = [torch.rand(n, generator=g) * 2 for n in (12, 30, 17, 25, 40, 8)]
    is_general = [False, True, False, True, False, False]
    res = _run(seqs, is_general, min_length=10, metric=metric)
    lit_r, lit_t, lit_g, margin = _literal_eda(seqs, is_general, min_length=10, metric=metric)
    torch.testing.assert_close(res.s_target.double(), torch.tensor(lit_t, dtype=torch.float64), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.s_general.double(), torch.tensor(lit_g, dtype=torch.float64), rtol=1e-4, atol=1e-5)
    for r, lr, m in zip(res.reward.tolist(), lit_r, margin):
        if m > 1e-6:
            assert r == lr


def _random_batch(seed, bsz, max_len):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, max_len + 1, (bsz,), generator=g).tolist()
    if bsz > 2:
        lens[0] = 0  # always an empty one
    scale = torch.rand(bsz, generator=g) * 3
    seqs = [torch.rand(n, generator=g) * float(scale[i]) for i, n in enumerate(lens)]
    is_general = (torch.rand(bsz, generator=g) < 0.3).tolist()
    return seqs, is_general


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    bsz=st.integers(1, 14),
    kl_direction=st.sampled_from(["scored_first", "short_first"]),
    general_reward=st.sampled_from(["mirror", "none"]),
    use_prompts=st.booleans(),
)
def test_matches_literal_reference_loop(seed, bsz, kl_direction, general_reward, use_prompts):
    seqs, is_general = _random_batch(seed, bsz, 90)
    pids = [i // 3 for i in range(bsz)] if use_prompts else None
    kw = dict(min_length=20, general_reward=general_reward, kl_direction=kl_direction)
    res = _run(seqs, is_general, prompt_ids=None if pids is None else torch.tensor(pids), **kw)
    lit_r, lit_t, lit_g, margin = _literal_eda(seqs, is_general, prompt_ids=pids, **kw)
    torch.testing.assert_close(res.s_target.double(), torch.tensor(lit_t, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.s_general.double(), torch.tensor(lit_g, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    for i, (r, lr, m) in enumerate(zip(res.reward.tolist(), lit_r, margin)):
        if m > 1e-6:
            assert r == lr, f"trajectory {i}: reward {r}, reference {lr} (margin {m})"


def test_random_batch_has_decisions_both_ways_and_is_deterministic(device):
    seqs, is_general = _random_batch(11, 24, 120)
    res = _run(seqs, is_general, device, min_length=20)
    assert all(t.device.type == device.type for t in res)
    res = EDAResult(*(t.cpu() for t in res))
    lit_r, _, _, margin = _literal_eda(seqs, is_general, min_length=20)
    decided = [(r, lr) for r, lr, m in zip(res.reward.tolist(), lit_r, margin) if m > 1e-6]
    assert all(r == lr for r, lr in decided)
    assert {r for r, _ in decided} == {0.0, 1.0}  # the batch exercises both outcomes
    again = _run(seqs, is_general, device, min_length=20)
    for x, y in zip(res, again):
        y = y.cpu()
        assert torch.equal(x, y)


def test_bad_input():
    values, cu = pack_sequences([_ramp(60), _ramp(70)])
    with pytest.raises(ValueError, match="is_general must have shape"):
        eda_reward(values, cu, torch.tensor([True]))
    with pytest.raises(ValueError, match="is_general must be bool"):
        eda_reward(values, cu, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="prompt_ids must hold integers"):
        eda_reward(values, cu, [False, True], prompt_ids=torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="general_reward must be one of"):
        eda_reward(values, cu, [False, True], general_reward="mirrored")
    with pytest.raises(ValueError, match="metric must be one of 'kl', 'hti', 'pl'"):
        eda_reward(values, cu, [False, True], metric="cos")
    with pytest.raises(ValueError, match="kl_direction must be one of"):
        eda_reward(values, cu, [False, True], kl_direction="long_first")
    with pytest.raises(ValueError, match="min_length must be an integer >= 0"):
        eda_reward(values, cu, [False, True], min_length=-1)
    with pytest.raises(ValueError, match="cu_seqlens must end at"):
        eda_reward(values, cu[:-1], [False])
    bad = values.clone()
    bad[65] = math.nan
    with pytest.raises(ValueError, match="trajectory 1 has a NaN entropy at token 5"):
        eda_reward(bad, cu, [False, True])


def test_combine_rewards():
    acc = torch.tensor([1.0, 0.0, 1.0])
    eda = EDAResult(torch.tensor([1.0, 1.0, 0.0]), torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.bool))
    assert combine_rewards(acc, eda).tolist() == [2.0, 1.0, 1.0]
    assert combine_rewards(acc, eda.reward, weight=0.5).tolist() == [1.5, 0.5, 1.0]
    out = combine_rewards(torch.tensor([1, 0, 1]), eda, weight=2.0)
    assert out.dtype == torch.float32 and out.tolist() == [3.0, 2.0, 1.0]
    assert combine_rewards(acc.double(), eda).dtype == torch.float64
    with pytest.raises(ValueError, match=r"acc has shape \(2,\) but eda has shape \(3,\)"):
        combine_rewards(acc[:2], eda)
    with pytest.raises(ValueError, match="weight must be a finite number"):
        combine_rewards(acc, eda, weight=math.nan)


def test_add_to_last_token():
    scores = torch.zeros(3, 5)
    scores[0, 2] = 1.0  # accuracy reward already at row 0's last token
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 0, 1, 0], [0, 0, 0, 0, 0]])
    out = add_to_last_token(scores, torch.tensor([0.5, 1.0, 1.0]), mask)
    expect = torch.zeros(3, 5)
    expect[0, 2] = 1.5
    expect[1, 3] = 1.0  # non-prefix mask: the last set position
    assert torch.equal(out, expect)  # row 2 (empty mask) unchanged
    assert scores[0, 2].item() == 1.0  # input untouched
    with pytest.raises(ValueError, match="bonus must have shape"):
        add_to_last_token(scores, torch.ones(2), mask)
    with pytest.raises(ValueError, match="response_mask must have the shape"):
        add_to_last_token(scores, torch.ones(3), mask[:, :4])


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_every_backend_gives_the_reference_rewards(backend, monkeypatch):
    """The reward is the same whichever kernel backend computes the maxima (small batch: the
    Triton kernels run under the interpreter on the CPU); empty rows first, inside and last."""
    monkeypatch.setenv("HEAL_KERNELS_BACKEND", backend)
    seqs, is_general = _random_batch(5, 10, 70)
    seqs[4] = seqs[9] = torch.zeros(0)
    res = _run(seqs, is_general, min_length=20)
    lit_r, lit_t, lit_g, margin = _literal_eda(seqs, is_general, min_length=20)
    torch.testing.assert_close(res.s_target.double(), torch.tensor(lit_t, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.s_general.double(), torch.tensor(lit_g, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    for r, lr, m in zip(res.reward.tolist(), lit_r, margin):
        if m > 1e-6:
            assert r == lr
