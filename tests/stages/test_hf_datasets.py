"""read_arrow on folders written by Hugging Face ``datasets``' ``save_to_disk`` (real folders, made by ``datasets``)."""

from __future__ import annotations

import json

import pytest

datasets = pytest.importorskip("datasets", reason="the `datasets` package (dev extra) writes the folders")

from pipeline import Pipeline  # noqa: E402
from stages import ReadArrow  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _dataset(n: int, tag: str) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": [f"{tag} document {i}" for i in range(n)], "id": list(range(n))})


def test_dataset_dict_folder_refused_without_split_and_read_with_it(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": _dataset(85, "train"), "validation": _dataset(10, "val")}).save_to_disk(str(folder))
    with pytest.raises(ValueError, match=r"DatasetDict folder with splits train, validation; set `split`"):
        ReadArrow(str(folder))
    with pytest.raises(ValueError, match=r"no split `test`"):
        ReadArrow(str(folder), split="test")
    for split, n in (("train", 85), ("validation", 10)):
        reloaded = datasets.load_from_disk(str(folder))[split]
        docs = list(ReadArrow(str(folder), split=split))
        assert len(docs) == n
        assert [(d["text"], d["id"]) for d in docs] == list(zip(reloaded["text"], reloaded["id"]))


def test_dataset_dict_split_from_a_config(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": _dataset(5, "train"), "validation": _dataset(3, "val")}).save_to_disk(str(folder))
    config = {"stages": {"read": {"type": "read_arrow", "paths": [str(folder)], "split": "validation"}}}
    assert [d["text"] for d in Pipeline.from_config(config, num_workers=0, rank=0, world_size=1)] == [
        f"val document {i}" for i in range(3)
    ]


def test_dataset_folder_read_in_the_datasets_own_file_order(tmp_path):
    folder = tmp_path / "ds"
    original = _dataset(1200, "d").shuffle(seed=0)
    original.save_to_disk(str(folder), num_shards=12)
    state = json.loads((folder / "state.json").read_text())
    state["_data_files"] = state["_data_files"][::-1]  # an order the file names do not give; `datasets` follows it
    (folder / "state.json").write_text(json.dumps(state))
    reloaded = datasets.load_from_disk(str(folder))
    assert reloaded["id"] != original["id"]  # the file order in state.json is the one `datasets` reads
    docs = list(ReadArrow(str(folder)))
    assert [d["id"] for d in docs] == reloaded["id"]
    assert len(docs) == 1200


def test_split_refused_where_no_dataset_dict(tmp_path):
    folder = tmp_path / "ds"
    _dataset(4, "d").save_to_disk(str(folder))
    with pytest.raises(ValueError, match=r"`split` is 'train' but no path is a Hugging Face DatasetDict folder"):
        ReadArrow(str(folder), split="train")
