"""heal.similarity: the registry of similarity functions."""

import pytest
import torch

from heal_kernels import reference as ref
from heal.similarity import (
    DEFAULT_KL_DIRECTION,
    DEFAULT_METRIC,
    KL_DIRECTIONS,
    METRICS,
    check_kl_direction,
    get_metric,
    metric_names,
)


def test_registry_contents():
    assert metric_names() == ("kl", "hti", "pl")
    assert DEFAULT_METRIC == "kl" and DEFAULT_KL_DIRECTION == "scored_first"
    assert get_metric("kl").needs_alignment and get_metric("hti").needs_alignment
    assert not get_metric("pl").needs_alignment
    assert get_metric("kl").kl_directions == KL_DIRECTIONS == ("scored_first", "short_first")
    assert get_metric("kl").directional and not get_metric("hti").directional
    for name, m in METRICS.items():
        assert m.name == name and m.description


@pytest.mark.parametrize("bad", ["KL", "cosine", "", None, 3])
def test_get_metric_lists_choices(bad):
    with pytest.raises(ValueError, match=r"metric must be one of 'kl', 'hti', 'pl', got"):
        get_metric(bad)


def test_check_kl_direction():
    for d in KL_DIRECTIONS:
        assert check_kl_direction(d) == d
    with pytest.raises(ValueError, match=r"kl_direction must be one of 'scored_first', 'short_first', got 'long_first'"):
        check_kl_direction("long_first")


def test_registry_matches_the_reference_spec():
    """Every registered name and direction is understood by the float64 reference, and
    ``needs_alignment`` / ``directional`` describe its behaviour."""
    a = torch.rand(7, dtype=torch.float64)
    b = torch.rand(13, dtype=torch.float64)
    for name, m in METRICS.items():
        # scored = the longer one, so the two kl directions differ
        vals = {d: ref.pair_similarity(b, a, name, d) for d in KL_DIRECTIONS}
        if m.directional:
            assert vals["scored_first"] != vals["short_first"]
        else:
            assert vals["scored_first"] == vals["short_first"]
    # an aligned metric sees the short sequence stretched to the long one's length, so
    # stretching it beforehand changes nothing; pl fits each sequence as it is, so it does change
    a_stretched = ref.stretch(a, b.numel())
    for name, m in METRICS.items():
        same = ref.pair_similarity(a, b, name) == pytest.approx(ref.pair_similarity(a_stretched, b, name), abs=1e-12)
        assert same == m.needs_alignment, name
