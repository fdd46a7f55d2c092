"""ReferenceStore: references persist atomically on real files, with bounded history."""

from __future__ import annotations

import json

import pytest

from agent.store.references import ReferenceStore, ReferenceStoreError


def profile(reference_id: str, rows: int = 10) -> dict[str, object]:
    return {"id": reference_id, "rows": rows, "features": {"age": {"psi_edges": [1.0, 2.0]}}}


def test_a_saved_reference_is_the_latest_and_survives_reopening(tmp_path):
    ReferenceStore(tmp_path).save("churn", "v1", profile("aaa"))
    reopened = ReferenceStore(tmp_path)
    assert reopened.latest("churn", "v1") == profile("aaa")
    assert reopened.models() == [("churn", "v1")]


def test_history_is_newest_first_and_bounded(tmp_path):
    store = ReferenceStore(tmp_path, history=3)
    for i in range(5):
        store.save("churn", "v1", profile(f"id{i}", rows=i))
    assert [p["id"] for p in store.history("churn", "v1")] == ["id4", "id3", "id2"]
    assert store.latest("churn", "v1") == profile("id4", rows=4)


def test_versions_are_kept_apart_and_an_empty_version_is_allowed(tmp_path):
    store = ReferenceStore(tmp_path)
    store.save("churn", "v1", profile("one"))
    store.save("churn", "", profile("unversioned"))
    assert store.latest("churn", "v1")["id"] == "one"
    assert store.latest("churn", "")["id"] == "unversioned"
    assert store.latest("churn", "v2") is None
    assert store.models() == [("churn", ""), ("churn", "v1")]


def test_forget_removes_every_version_of_a_model_only(tmp_path):
    store = ReferenceStore(tmp_path)
    store.save("churn", "v1", profile("a"))
    store.save("churn", "v2", profile("b"))
    store.save("fraud", "v1", profile("c"))
    assert store.forget("churn") == 2
    assert store.models() == [("fraud", "v1")]
    assert store.forget("churn") == 0


@pytest.mark.parametrize("name", ["../escape", "a/b", "", "..", "x" * 129])
def test_names_that_could_escape_the_store_are_refused(tmp_path, name):
    store = ReferenceStore(tmp_path)
    with pytest.raises(ValueError, match="not a safe name"):
        store.save(name, "v1", profile("a"))
    with pytest.raises(ValueError, match="not a safe name"):
        store.save("m", "v1", profile(name or "-/-"))


def test_nan_is_refused_rather_than_written_as_invalid_json(tmp_path):
    with pytest.raises(ValueError):
        ReferenceStore(tmp_path).save("m", "v1", {"id": "a", "mean": float("nan")})
    assert ReferenceStore(tmp_path).latest("m", "v1") is None


def test_a_corrupt_file_is_an_error_naming_it(tmp_path):
    store = ReferenceStore(tmp_path)
    path = store.save("m", "v1", profile("a"))
    path.write_text("{not json")
    with pytest.raises(ReferenceStoreError, match=path.name):
        store.latest("m", "v1")


def test_no_temporary_files_are_left_behind(tmp_path):
    store = ReferenceStore(tmp_path)
    path = store.save("m", "v1", profile("a"))
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert json.loads(path.read_text())["id"] == "a"


def test_versions_with_any_wire_character_are_stored_and_listed(tmp_path):
    store = ReferenceStore(tmp_path)
    for version in ("v1+build.7", "2024/01", "..", "ü", "_", "a_b"):
        store.save("m", version, profile("a"))
        assert store.latest("m", version)["id"] == "a"
    assert sorted(v for _, v in store.models()) == sorted(
        ["v1+build.7", "2024/01", "..", "ü", "_", "a_b"]
    )
    assert all(p.parent.parent == tmp_path / "m" for p in tmp_path.rglob("*.json"))


def test_the_empty_version_and_a_version_named_underscore_are_kept_apart(tmp_path):
    store = ReferenceStore(tmp_path)
    store.save("m", "", profile("empty"))
    store.save("m", "_", profile("underscore"))
    assert store.latest("m", "")["id"] == "empty"
    assert store.latest("m", "_")["id"] == "underscore"


def test_saving_the_current_reference_again_does_not_push_out_history(tmp_path):
    store = ReferenceStore(tmp_path, history=2)
    store.save("m", "v1", profile("old"))
    store.save("m", "v1", profile("new"))
    store.save("m", "v1", profile("new"))
    assert [p["id"] for p in store.history("m", "v1")] == ["new", "old"]
