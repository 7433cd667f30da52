"""The one top-k: order kept, ties deterministic, errors clear."""
from __future__ import annotations

import pytest
import torch

from infinipot_ros.kv import gather_tokens, keep_topk


def test_keep_topk_sorted_by_original_index():
    s = torch.tensor([[[0.1, 5.0, 3.0, 4.0, -1.0], [9.0, 0.0, 8.0, 7.0, 1.0]]])
    idx = keep_topk(s, 3)
    assert idx.tolist() == [[[1, 2, 3], [0, 2, 3]]]


def test_keep_topk_ties_prefer_earlier_and_nan_is_lowest():
    s = torch.tensor([[[float("inf"), 1.0, float("inf"), float("nan"), float("inf")]]])
    assert keep_topk(s, 2).tolist() == [[[0, 2]]]
    assert 3 not in keep_topk(s, 4)[0, 0].tolist()


def test_keep_topk_bounds():
    s = torch.zeros(1, 2, 4)
    assert keep_topk(s, 4).tolist() == [[[0, 1, 2, 3]] * 2]
    assert keep_topk(s, 0).shape == (1, 2, 0)
    with pytest.raises(ValueError):
        keep_topk(s, 5)
    with pytest.raises(ValueError):
        keep_topk(torch.zeros(4), 1)


def test_gather_tokens_per_head():
    x = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(1, 2, 3, 2)
    idx = torch.tensor([[[0, 2], [1, 2]]])
    out = gather_tokens(x, idx)
    assert out[0, 0].tolist() == [[0, 1], [4, 5]]
    assert out[0, 1].tolist() == [[8, 9], [10, 11]]
    assert gather_tokens(x[..., 0], idx).tolist() == [[[0, 4], [8, 10]]]


@pytest.mark.parametrize("seed", range(5))
def test_keep_topk_equals_stable_sort_rule_with_many_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randint(-3, 4, (3, 2, 300), generator=gen).float()  # heavy ties
    s[0, 0, ::7] = float("inf")
    s[1, 1, ::5] = float("nan")
    s[2, 0, :40] = -0.0  # equal to +0.0 as floats: a tie, broken by position
    for k in (1, 37, 150, 299):
        ref = torch.sort(torch.sort(torch.nan_to_num(s, nan=float("-inf")), dim=-1, descending=True,
                                    stable=True).indices[..., :k], dim=-1).values
        assert torch.equal(keep_topk(s, k), ref), k
