"""Bytes autograd keeps for the backward pass of one verl micro-batch, with and without heal's
entropy-graph fix (``heal.integrations.verl.entropy_graph``), on CPU.

Runs verl's real ``FSDPEngineWithLMHead.forward_step`` (prepare_model_inputs -> prepare_model_outputs
-> verl's ppo_loss) with a one-matrix LM head, through the harness of
``tests/integrations/test_verl_entropy_graph.py``, for heal's two entropy losses at
``entropy_coeff = 0``:

* before: the entropy is computed with autograd and verl adds ``0 * entropy_loss`` to the loss;
* after:  heal's hand-over (detached entropy, verl's 0-term skipped, FSDP entropy under no_grad);
* floor:  the same step with ``calculate_entropy=false`` (no entropy at all).

Writes ``benchmarks/results/verl_entropy_graph-cpu.{json,md,png}``. Usage::

    python benchmarks/verl_entropy_graph.py [--tokens 1024] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _harness():
    path = os.path.join(ROOT, "tests", "integrations", "test_verl_entropy_graph.py")
    spec = importlib.util.spec_from_file_location("_verl_entropy_graph_harness", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Patch:
    def setattr(self, obj, name, value):
        setattr(obj, name, value)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[110, 1024], help="tokens per micro-batch")
    ap.add_argument("--vocab", type=int, nargs="+", default=[3000, 32000], help="vocabulary size (one per --tokens)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "verl_entropy_graph-cpu"))
    args = ap.parse_args(argv)
    if len(args.tokens) != len(args.vocab):
        ap.error("--tokens and --vocab need the same number of values")
    import torch
    import verl

    h = _harness()
    rows = []
    for n_tokens, vocab in zip(args.tokens, args.vocab):
        n_seq = 4 if n_tokens >= 64 else 1
        prompt = max(1, n_tokens // (4 * n_seq))
        h.VOCAB, h.PROMPTS = vocab, [prompt] * n_seq
        h.RESPONSES = [n_tokens // n_seq - prompt] * n_seq
        h.N_TOKENS = sum(h.PROMPTS) + sum(h.RESPONSES)
        engine = h.engine.__wrapped__(_Patch())
        _, floor, _, _ = h._step(engine, "vanilla", heal_on=True, calculate_entropy=False)
        for mode in ("high_entropy_tokens", "entropy_advantage"):
            _, before, _, _ = h._step(engine, mode, heal_on=False)
            _, after, _, _ = h._step(engine, mode, heal_on=True)
            rows.append({"tokens": h.N_TOKENS, "vocab": vocab, "loss_mode": mode,
                         "logits_fp32_bytes": h.N_TOKENS * vocab * 4,
                         "retained_before_bytes": before, "retained_after_bytes": after,
                         "retained_no_entropy_bytes": floor})
            print(f"{mode:20s} N={h.N_TOKENS} V={vocab}: before {before / 2**20:.2f} MiB, after {after / 2**20:.2f} MiB, "
                  f"no entropy {floor / 2**20:.2f} MiB (logits {h.N_TOKENS * vocab * 4 / 2**20:.2f} MiB)")
    meta = {"device": platform.processor() or platform.machine(), "torch": torch.__version__, "verl": verl.__version__,
            "python": sys.version.split()[0], "what": "bytes of tensors saved for backward still alive after forward_step"}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    lines = ["| loss mode | tokens | vocab | logits fp32 (MiB) | kept before (MiB) | kept after (MiB) | no entropy (MiB) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['loss_mode']} | {r['tokens']} | {r['vocab']} | {mib(r['logits_fp32_bytes'])} | "
              f"{mib(r['retained_before_bytes'])} | {mib(r['retained_after_bytes'])} | {mib(r['retained_no_entropy_bytes'])} |"
              for r in rows]
    with open(args.out + ".md", "w") as f:
        f.write(f"# verl update pass: bytes kept for backward (entropy_coeff = 0)\n\n{json.dumps(meta)}\n\n" + "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [f"{r['loss_mode']}\nN={r['tokens']} V={r['vocab']}" for r in rows]
    x = range(len(rows))
    for k, (key, name) in enumerate((("retained_before_bytes", "before"), ("retained_after_bytes", "after"),
                                     ("retained_no_entropy_bytes", "no entropy"))):
        ax.bar([i + 0.27 * (k - 1) for i in x], [r[key] / r["logits_fp32_bytes"] for r in rows], width=0.27, label=name)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("kept for backward / fp32 logits")
    ax.set_title("verl update pass, entropy_coeff = 0 (CPU)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(args.out + ".png", dpi=120, bbox_inches="tight")
    print(f"wrote {args.out}.json/.md/.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
