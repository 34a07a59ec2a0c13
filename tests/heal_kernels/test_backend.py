"""HEAL_KERNELS_BACKEND: unset or empty is auto; anything else must be a backend name."""

import pytest
import torch

from heal_kernels import token_entropy
from heal_kernels._backend import BACKENDS, requested_backend, resolve_backend


@pytest.mark.parametrize("value", ["", "  "])
def test_empty_env_var_means_auto(monkeypatch, value):
    monkeypatch.setenv("HEAL_KERNELS_BACKEND", value)
    assert requested_backend() == "auto"
    assert resolve_backend(torch.device("cpu")) == "cpu"
    z = torch.randn(3, 17)
    monkeypatch.delenv("HEAL_KERNELS_BACKEND")
    expected = token_entropy(z)
    monkeypatch.setenv("HEAL_KERNELS_BACKEND", value)
    assert torch.equal(token_entropy(z), expected)


def test_invalid_env_var_lists_the_valid_values(monkeypatch):
    monkeypatch.setenv("HEAL_KERNELS_BACKEND", "gpu")
    with pytest.raises(ValueError) as err:
        requested_backend()
    msg = str(err.value)
    assert "$HEAL_KERNELS_BACKEND='gpu'" in msg
    assert all(name in msg for name in BACKENDS)
    with pytest.raises(ValueError, match="HEAL_KERNELS_BACKEND"):
        token_entropy(torch.randn(2, 5))
    monkeypatch.setenv("HEAL_KERNELS_BACKEND", " Torch ")
    assert requested_backend() == "torch"


def test_explicit_backend_argument():
    assert requested_backend("cpu") == "cpu"
    with pytest.raises(ValueError, match="backend='gpu' is not a backend; valid values: auto, triton, cpu, torch"):
        requested_backend("gpu")
    with pytest.raises(ValueError, match="not a backend"):
        requested_backend("")  # an explicit empty argument is a mistake, not "unset"
