"""heal_kernels: fused ops for entropy-aware RL, knowing nothing of RL.

* :func:`token_entropy`, :func:`entropy_and_logprobs` -- per-token entropy and label log-probs
  straight from logits, forward and backward, never materialising probabilities.
* :func:`linear_entropy_and_logprobs`, :func:`linear_token_entropy` -- the same straight from hidden
  states and a linear head (``hidden @ weight.T + bias``), one block of logits at a time: never
  ``[tokens x vocab]``; optionally over a vocabulary-parallel process group.
* :func:`pairwise_similarity`, :func:`grouped_max_similarity` -- all-pairs interpolated
  softmax-KL (or HTI / PL) between ragged entropy sequences, with the EDA reductions fused in.

CUDA tensors run Triton kernels; CPU tensors run C++/OpenMP kernels (built on first use, cached
in ``TORCH_EXTENSIONS_DIR``) or, without a compiler or with ``HEAL_KERNELS_NO_BUILD=1``, chunked
pure-torch code. ``HEAL_KERNELS_BACKEND=auto|triton|cpu|torch`` overrides the choice
(:mod:`heal_kernels._backend`); ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` set before
triton is imported (the Triton interpreter; slow, for tests). The C++ kernels use
:func:`available_cpus` threads (this process's affinity mask) unless given ``num_threads=``;
torch's global thread setting is neither read nor changed.
"""

from heal_kernels._backend import available_cpus
from heal_kernels.ops.entropy import entropy_and_logprobs, token_entropy
from heal_kernels.ops.linear import linear_entropy_and_logprobs, linear_token_entropy
from heal_kernels.ops.pairwise import grouped_max_similarity, pairwise_similarity

__all__ = [
    "token_entropy",
    "entropy_and_logprobs",
    "linear_entropy_and_logprobs",
    "linear_token_entropy",
    "pairwise_similarity",
    "grouped_max_similarity",
    "available_cpus",
]
__version__ = "0.1.0"
