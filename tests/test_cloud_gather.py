"""Gather* groups: the --groups grammar, the shape check, and the scale/cast step with its fp16 guard."""

from __future__ import annotations

import pytest
import torch

from mist.cloud.errors import CloudError
from mist.cloud.gather import check_group_shapes, finish, format_groups, parse_groups


@pytest.mark.parametrize("spec, expected", [
    ("all", [[0, 1, 2, 3, 4]]),
    ("each", [[0], [1], [2], [3], [4]]),
    ("last", [[4]]),
    ("2", [[2]]),
    ("0-4", [[0, 1, 2, 3, 4]]),
    ("0-1,2-4", [[0, 1], [2, 3, 4]]),
    (" 3 , last ", [[3], [4]]),
    ("2-last", [[2, 3, 4]]),
    ("1-1", [[1]]),
    ("ALL", [[0, 1, 2, 3, 4]]),
])
def test_parse_groups(spec: str, expected: list[list[int]]) -> None:
    assert parse_groups(spec, 5) == expected


@pytest.mark.parametrize("spec, message", [
    ("5", "layer 5 does not exist (layers are 0-4"),
    ("0-9", "layer 9 does not exist"),
    ("3-1", "runs backwards"),
    ("a", "'a' is not a layer index"),
    ("1,,2", "empty group"),
    ("", "empty group"),
    ("-2", "'' is not a layer index"),
    ("1.5", "'1.5' is not a layer index"),
])
def test_parse_groups_errors(spec: str, message: str) -> None:
    with pytest.raises(CloudError, match=None) as err:
        parse_groups(spec, 5)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_format_groups_round_trips() -> None:
    for spec in ("0-12", "0-6,7-12", "3", "1,2-4"):
        assert format_groups(parse_groups(spec, 13)) == spec


def test_group_shapes_must_agree_across_the_set() -> None:
    shapes = [(196, 80)] * 3 + [(49, 192)] * 4 + [(49, 320)]
    names = [f"blocks.{i}" for i in range(8)]
    assert check_group_shapes([[3, 4, 5, 6]], shapes, names) == (49, 192)
    assert check_group_shapes([[3, 4], [5, 6]], shapes, names) == (49, 192)
    with pytest.raises(CloudError) as err:
        check_group_shapes([[5, 6, 7]], shapes, names)
    text = str(err.value)
    assert "(T=49, d=192): 5-6 (blocks.5..blocks.6)" in text and "(T=49, d=320): 7 (blocks.7)" in text
    assert "try --groups auto (here 3-6)" in text
    # Two groups that are each uniform but differ from each other cannot share one (n, k, T, d) tensor.
    with pytest.raises(CloudError, match="different shapes"):
        check_group_shapes([[0, 1], [3, 4]], shapes, names)


def test_finish_scales_and_casts() -> None:
    sums = torch.randn(3, 2, 5, 4) * 10
    groups = [[0, 1, 2, 3], [7]]
    plain = finish(sums, groups, "none", "float16")
    assert plain.dtype == torch.float16 and torch.equal(plain, sums.half())
    mean = finish(sums, groups, "mean", "float32")
    assert torch.equal(mean[:, 0], sums[:, 0] / 4) and torch.equal(mean[:, 1], sums[:, 1])


def test_finish_refuses_fp16_overflow() -> None:
    sums = torch.zeros(2, 2, 3, 4)
    sums[1, 1, 2, 3] = 7e4
    groups = [[0], [1, 2]]
    with pytest.raises(CloudError) as err:
        finish(sums, groups, "none", "float16")
    assert "group 1 (layers 1-2)" in str(err.value) and "--scale mean or --dtype float32" in str(err.value)
    assert finish(sums, groups, "mean", "float16").isfinite().all()  # 3.5e4 fits
    assert finish(sums, groups, "none", "float32").isfinite().all()
