"""heal's fused linear entropy vs the unfused path, forward + backward, run alternately (A B A B ...)
so that both see the same load on a shared machine; prints one JSON line per run.

    python benchmarks/linear_interleaved.py [--shape 4096x896x151936] [--pairs 2]

The full comparison (more baselines, memory) is ``heal bench linear``; this only answers "which is
faster right now" where the machine's load changes from minute to minute.
"""

import argparse
import json
import os
import time

import torch

import heal_kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4096x896x151936", help="tokens x hidden x vocabulary")
    parser.add_argument("--pairs", type=int, default=2, help="heal / unfused pairs to run (default 2)")
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()
    n, d, v = (int(x) for x in args.shape.lower().split("x"))
    torch.manual_seed(0)
    h = torch.randn(n, d)
    w = torch.randn(v, d) * (2.0 / d**0.5)
    labels = torch.randint(0, v, (n,))
    g_e, g_lp = torch.randn(n), torch.randn(n)
    t = args.temperature

    def heal():
        hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
        e, lp = heal_kernels.linear_entropy_and_logprobs(hg, wg, labels, t)
        torch.autograd.grad((e * g_e + lp * g_lp).sum(), (hg, wg))

    def unfused():
        hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
        e, lp = heal_kernels.entropy_and_logprobs(hg @ wg.T, labels, t)
        torch.autograd.grad((e * g_e + lp * g_lp).sum(), (hg, wg))

    for _ in range(args.pairs):
        for name, fn in (("heal", heal), ("unfused", unfused)):
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            print(json.dumps({"variant": name, "shape": [n, d, v], "fwdbwd_s": round(dt, 2),
                              "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
    main()
