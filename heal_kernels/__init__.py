"""heal_kernels: fused ops for entropy-aware RL, knowing nothing of RL.

* :func:`token_entropy`, :func:`entropy_and_logprobs` -- per-token entropy and label log-probs
  straight from logits, forward and backward, never materialising probabilities.
* :func:`pairwise_similarity`, :func:`grouped_max_similarity` -- all-pairs interpolated
  softmax-KL (or HTI / PL) between ragged entropy sequences, with the EDA reductions fused in.

CUDA tensors run Triton kernels; CPU tensors run C++ / chunked-torch kernels. Set
``HEAL_TRITON_INTERPRET=1`` (with ``TRITON_INTERPRET=1``) to run the Triton kernels on CPU tensors
under the Triton interpreter (tests).
"""

from heal_kernels.ops.entropy import entropy_and_logprobs, token_entropy
from heal_kernels.ops.pairwise import grouped_max_similarity, pairwise_similarity

__all__ = [
    "token_entropy",
    "entropy_and_logprobs",
    "pairwise_similarity",
    "grouped_max_similarity",
]
__version__ = "0.1.0"
