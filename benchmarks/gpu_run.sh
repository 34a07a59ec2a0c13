#!/usr/bin/env bash
# One script for a lent GPU machine (H100 / H200, < 10 minutes): the CUDA test suite, the op
# benchmarks, then the static performance model with the measured figures next to its predictions;
# results under benchmarks/results/ (named after the device). Usage from the repo root:
#   bash benchmarks/gpu_run.sh [OUT_DIR] [all|vllm]
# Torch and Triton must already be installed there; heal is used from the source tree. Where vLLM is
# installed, a last step (up to 4 more minutes; `vllm` runs it alone) checks heal's entropy capture
# under vLLM's Model Runner V2 against teacher-forced entropies; without vLLM it is skipped.
set -uo pipefail
out=${1:-benchmarks/results}
steps=${2:-all}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu-info.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu-info.txt"
status=0
if [ "$steps" = all ]; then
# kernel tests on CUDA (the compile gate included; the sync-free test runs here); the timeouts add up
# to under 10 minutes, the device tool's limit for one command
timeout 200 python -m pytest -q -x tests/heal_kernels 2>&1 | tee "$out/gpu-tests.log" || status=1
timeout 120 python -m heal bench entropy --output-dir "$out" 2>&1 | tee "$out/gpu-bench-entropy.log" || status=1
timeout 90 python -m heal bench eda --output-dir "$out" 2>&1 | tee "$out/gpu-bench-eda.log" || status=1
timeout 90 python -m heal bench linear --output-dir "$out" 2>&1 | tee "$out/gpu-bench-linear.log" || status=1
# predictions from the SASS (sm_80/90/100) next to what was just measured on this GPU
measured=$(ls "$out"/eda-*.json "$out"/entropy-*.json 2>/dev/null | grep -v -- '-cpu\.json' | tr '\n' ' ')
timeout 90 python -m heal bench static --jobs 8 --output-dir "$out" --measured $measured 2>&1 | tee "$out/gpu-bench-static.log" || status=1
fi

# heal's entropy processor under vLLM's Model Runner V2 (vLLM's default runner on GPUs): a tiny random
# Llama (peaked output head, so entropies differ from token to token), 4 prompts x 3 samples x 24 tokens;
# every captured entropy is compared with the teacher-forced float32 one of the same completion (the
# tolerance allows TF32 matmuls in vLLM; a position off by one or the wrong temperature is shown to be
# far outside it). HEAL_VLLM_CHECK_RUNNER=any accepts the V1 / CPU runner (to try the step on a CPU).
if ! python -c "import vllm" >/dev/null 2>&1; then
  echo "vLLM is not installed here: the Model Runner V2 entropy check is skipped" | tee "$out/gpu-vllm-v2.log"
else
timeout 240 python - "$out" <<'PY' 2>&1 | tee "$out/gpu-vllm-v2.log" || status=1
import json, os, sys, tempfile, time

out = sys.argv[1]
want = os.environ.get("HEAL_VLLM_CHECK_RUNNER", "v2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
import torch
from transformers import LlamaConfig, LlamaForCausalLM

t0 = time.time()
folder = tempfile.mkdtemp(prefix="heal-vllm-v2-")
cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).float()
with torch.no_grad():
    model.lm_head.weight.mul_(25.0)
model.save_pretrained(folder)

import vllm
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from heal.rollout.vllm import EXTENSION_FQCN, PROCESSOR_FQCN, VLLMBackend, _merge_worker_records
from heal.rollout.vllm_entropy import entropy_extra_args
from heal_kernels.reference import token_entropy

llm = LLM(model=folder, skip_tokenizer_init=True, dtype="float32", max_model_len=256, enforce_eager=True,
          kv_cache_memory_bytes=1 << 28, seed=0, logits_processors=[PROCESSOR_FQCN], worker_extension_cls=EXTENSION_FQCN)
use_v2 = bool(llm.llm_engine.vllm_config.use_v2_model_runner)
interfaces = llm.collective_rpc("heal_entropy_interfaces")
g = torch.Generator().manual_seed(1)
prompts = [torch.randint(3, 512, (int(n),), generator=g).tolist() for n in (5, 9, 12, 7)]
setups = [(0.8, "sampling"), (0.8, "sampling"), (1.3, 1.0), (0.5, "sampling")]  # (T, entropy temperature)
tags = [f"check/{i}" for i in range(len(prompts))]
params = [SamplingParams(n=3, temperature=t, top_p=1.0, top_k=-1, min_p=0.0, max_tokens=24, seed=100 * i,
                         detokenize=False, extra_args=entropy_extra_args(tags[i], te))
          for i, (t, te) in enumerate(setups)]
res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
records = _merge_worker_records(llm.collective_rpc("heal_take_entropies", args=(tags,)))
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cuda.matmul.allow_tf32 = False
model = model.to(device).eval()
worst = shifted = wrong_t = 0.0
n_tok = n_comp = missing = 0
for i, r in enumerate(res):
    t, te = setups[i]
    t_ent = t if te == "sampling" else te
    for o in r.outputs:
        toks = [int(x) for x in o.token_ids]
        got = VLLMBackend._match(records.get(tags[i], []), params[i].seed + o.index, toks)
        if got is None:
            missing += 1
            continue
        ids = torch.tensor([prompts[i] + toks], device=device)
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompts[i]) - 1: len(prompts[i]) - 1 + len(toks)].double().cpu()
        ref = token_entropy(logits, temperature=t_ent)
        got = torch.tensor(got, dtype=torch.float64)
        worst = max(worst, (got - ref).abs().max().item())
        if len(toks) > 1:
            shifted = max(shifted, (got[1:] - ref[:-1]).abs().max().item())
        wrong_t = max(wrong_t, (got - token_entropy(logits, temperature=1.0 if t_ent != 1.0 else 0.5)).abs().max().item())
        n_tok += len(toks)
        n_comp += 1
tol = 1e-2
summary = {"vllm": vllm.__version__, "torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda"
           else "cpu", "use_v2_model_runner": use_v2, "processor_interfaces": interfaces, "completions": n_comp,
           "tokens": n_tok, "missing": missing, "max_abs_err": worst, "tolerance": tol,
           "max_abs_err_if_shifted_by_one": shifted, "max_abs_err_at_a_wrong_temperature": wrong_t,
           "seconds": round(time.time() - t0, 1)}
print(json.dumps(summary, indent=1))
json.dump(summary, open(os.path.join(out, "vllm-v2-check.json"), "w"), indent=1)
ok = (missing == 0 and n_comp == 12 and worst <= tol and shifted > 10 * tol and wrong_t > 10 * tol
      and (not (want == "v2") or (use_v2 and all(x == ["v2"] for x in interfaces))))
print("vLLM entropy check:", "ok" if ok else "FAILED")
sys.exit(0 if ok else 1)
PY
fi
exit $status
