"""One rank of the 2-process vocabulary-parallel test (tests/heal_kernels/test_linear.py).

Run as ``python vocab_parallel_worker.py RANK WORLD INIT_FILE INPUTS.pt OUTPUT.pt``: joins a gloo
group through ``INIT_FILE``, takes its contiguous shard of the weight and bias from ``INPUTS.pt``,
runs ``linear_entropy_and_logprobs`` with the group, backpropagates the given upstream gradients
and saves ``(entropy, logprobs, d_hidden, d_weight_shard, d_bias_shard)`` to ``OUTPUT.pt``.
"""

import sys

import torch
import torch.distributed as dist

from heal_kernels import linear_entropy_and_logprobs


def main(rank: int, world: int, init_file: str, inputs: str, output: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        h, w, b, labels, g_e, g_lp, temperature = torch.load(inputs)
        v_local = w.shape[0] // world
        shard = slice(rank * v_local, (rank + 1) * v_local)
        hh = h.clone().requires_grad_()
        ws = w[shard].clone().requires_grad_()
        bs = b[shard].clone().requires_grad_()
        e, lp = linear_entropy_and_logprobs(
            hh, ws, labels, temperature, bias=bs, chunk_tokens=8, chunk_vocab=16, process_group=dist.group.WORLD
        )
        ((e * g_e).sum() + (lp * g_lp).sum()).backward()
        torch.save((e.detach(), lp.detach(), hh.grad, ws.grad, bs.grad), output)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
