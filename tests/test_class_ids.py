"""class_ids.json in both orientations: value -> name (as MVTec 3D-AD ships it) and name -> value."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmad.data import Category, dataset_info
from cmad.data.mvtec3d import parse_class_ids
from cmad.errors import DataError
from fixture_mvtec import make_mvtec_like_tree

REAL_TIRE = {"255": "contamination", "254": "cut", "253": "hole", "0": "good"}
EXPECTED = {"contamination": 255, "cut": 254, "hole": 253, "good": 0}


def _category(tmp_path: Path, content: str) -> Category:
    cat = make_mvtec_like_tree(tmp_path, category="widget", size=(24, 32), n_train=1,
                               n_validation=1, n_test_good=1, defects={"cut": [254]})
    (cat / "class_ids.json").write_text(content)
    return Category(cat)


def test_real_orientation_value_to_name(tmp_path: Path) -> None:
    cat = _category(tmp_path, json.dumps(REAL_TIRE))
    assert cat.class_ids == EXPECTED


def test_name_to_value_orientation_still_read(tmp_path: Path) -> None:
    cat = _category(tmp_path, json.dumps(EXPECTED))
    assert cat.class_ids == EXPECTED


def test_digit_string_values_and_whitespace() -> None:
    assert parse_class_ids({"cut": "254", "good": "0"}, Path("x.json")) == {"cut": 254, "good": 0}
    assert parse_class_ids({" 7 ": " scratch "}, Path("x.json")) == {"scratch": 7}
    assert parse_class_ids({}, Path("x.json")) == {}


def test_info_reports_no_problem_for_real_file(tmp_path: Path) -> None:
    cat = _category(tmp_path, json.dumps(REAL_TIRE))
    info = dataset_info(cat.root)["categories"]["widget"]
    assert not any("class_ids" in p for p in info["problems"]), info["problems"]


@pytest.mark.parametrize("content, needle", [
    ("[1, 2]", "expected a JSON object"),
    ("{not json", "invalid class_ids.json"),
    (json.dumps({"255": "cut", "hole": 253}), "mix orientations"),
    (json.dumps({"255": 254}), "fits neither orientation"),
    (json.dumps({"cut": "hole"}), "fits neither orientation"),
    (json.dumps({"cut": 300}), "fits neither orientation"),
    (json.dumps({"cut": True}), "fits neither orientation"),
    (json.dumps({"-1": "cut"}), "fits neither orientation"),
    (json.dumps({"255": "cut", "254": "cut"}), "'cut' appears twice"),
    (json.dumps({"cut": 255, "hole": 255}), "gt value 255 appears twice"),
])
def test_malformed_file_is_a_data_error_naming_it(tmp_path: Path, content: str,
                                                   needle: str) -> None:
    cat = _category(tmp_path, content)
    with pytest.raises(DataError, match="invalid class_ids.json") as err:
        _ = cat.class_ids
    assert err.value.path == cat.root / "class_ids.json"
    assert needle in str(err.value)
    problems = dataset_info(cat.root)["categories"]["widget"]["problems"]
    assert any(str(cat.root / "class_ids.json") in p and needle in p for p in problems)
