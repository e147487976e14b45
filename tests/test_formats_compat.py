"""check_compatible refuses a train/test pair whose features mean different things, naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from format_fixtures import make_manifest, one_line, small_set

from mist.formats import FeatureSet, FormatError, check_compatible

BASE = make_manifest()


@pytest.mark.parametrize("change, field", [
    ({"backbone": {**BASE.backbone, "name": "vit_small_patch16_224"}}, "backbone.name"),
    ({"backbone": {**BASE.backbone, "weights_sha256": "ef" * 32}}, "backbone.weights_sha256"),
    ({"groups": [[0, 1, 2], [3, 4]]}, "gather.groups"),
    ({"groups": [[3, 4, 5], [0, 1, 2]]}, "gather.groups"),  # same layers, other order: other features
    ({"scale": "mean"}, "gather.scale"),
    ({"tokens": 6}, "tokens.count"),
    ({"prefix_tokens": 0}, "tokens.prefix"),
    ({"grid": [1, 4]}, "tokens.grid"),
    ({"grid": None}, "tokens.grid"),
    ({"dim": 8}, "dim"),
    # the innermost field that differs is named, not the whole object (whose text would be cut off before it)
    ({"data_config": {**BASE.data_config, "interpolation": "bilinear"}}, "data_config.interpolation"),
    ({"data_config": {**BASE.data_config, "mean": [0.485, 0.456, 0.406]}}, "data_config.mean"),
    ({"data_config": {**BASE.data_config, "crop_pct": 1.0}}, "data_config.crop_pct"),
    ({"data_config": {k: v for k, v in BASE.data_config.items() if k != "crop_mode"}}, "data_config.crop_mode"),
    ({"classes": ["cat", "dog"]}, "classes"),
    ({"classes": ["dog", "cat", "eel"]}, "classes"),  # same names, other output units
])
def test_each_difference_is_refused_and_named(change: dict[str, Any], field: str) -> None:
    other = make_manifest(**change)
    for a, b in ((BASE, other), (other, BASE)):
        with pytest.raises(FormatError) as info:
            check_compatible(a, b)
        message = str(info.value)
        assert f"'{field}'" in message and one_line(message), message


def test_equal_layouts_are_compatible() -> None:
    # The split, dataset identity, shards and storage dtype may differ: train and test sets always do.
    test_split = make_manifest(split="test", dataset={"source": "synthetic", "hash": "ef" * 32},
                               dtype="float32")
    check_compatible(BASE, test_split)
    check_compatible(BASE, BASE)


def test_classes_false_skips_only_the_classes() -> None:
    unlabelled = make_manifest(classes=[])
    check_compatible(BASE, unlabelled, classes=False)
    with pytest.raises(FormatError, match="'classes'"):
        check_compatible(BASE, unlabelled)
    with pytest.raises(FormatError, match="'dim'"):
        check_compatible(BASE, make_manifest(classes=[], dim=8), classes=False)


def test_check_compatible_on_sets_read_from_disk(tmp_path: Path) -> None:
    small_set(tmp_path / "train", n=20)
    small_set(tmp_path / "test", n=12, split="test")
    small_set(tmp_path / "other", n=12, tokens=6, prefix_tokens=2)
    train, test, other = (FeatureSet(tmp_path / name) for name in ("train", "test", "other"))
    check_compatible(train.manifest, test.manifest)
    with pytest.raises(FormatError, match="'tokens.count'"):
        check_compatible(train.manifest, other.manifest)
