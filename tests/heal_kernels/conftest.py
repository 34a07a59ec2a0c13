"""Fixtures shared by the heal_kernels tests."""

import shutil

import pytest


@pytest.fixture(scope="session")
def cpu_ext():
    """The compiled C++ pairwise extension (one build shared by every test; skipped without a compiler)."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    from heal_kernels.cpu import load_pairwise

    ext = load_pairwise()
    assert ext is not None, "the C++ extension failed to build"
    return ext
