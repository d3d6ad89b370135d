"""Atomic writes and JSON-lines records."""

from __future__ import annotations

import os

import pytest

from leanfit.core.io import (
    append_jsonl,
    atomic_dir,
    atomic_write_text,
    read_jsonl,
    rewrite_jsonl,
    sha256_file,
)


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]


def test_failed_write_keeps_old_content(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_atomic_dir_replaces_whole_folder_or_nothing(tmp_path):
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_read_jsonl_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    for step in range(3):
        append_jsonl(path, {"step": step, "loss": 1.0 / (step + 1)})
    with open(path, "a") as fh:
        fh.write('{"step": 3, "lo')
    assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2]
    path.write_text('{"step": 0}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError):
        read_jsonl(path)


def test_rewrite_jsonl_keeps_matching_records(tmp_path):
    path = tmp_path / "m.jsonl"
    for step in range(5):
        append_jsonl(path, {"step": step})
    assert rewrite_jsonl(path, lambda r: r["step"] <= 2) == 3
    assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2]


def test_sha256_file_matches_hashlib(tmp_path):
    import hashlib

    path = tmp_path / "x.bin"
    data = os.urandom(5_000_000)
    path.write_bytes(data)
    assert sha256_file(path, chunk=1 << 16) == hashlib.sha256(data).hexdigest()


def test_atomic_save_tensors_round_trips(tmp_path):
    import torch
    from safetensors.torch import load_file

    from leanfit.core.io import atomic_save_tensors

    w = torch.randn(3, 4).t()  # non-contiguous
    atomic_save_tensors(tmp_path / "t.safetensors", {"w": w})
    assert torch.equal(load_file(str(tmp_path / "t.safetensors"))["w"], w)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


def test_atomic_write_csv_takes_every_column_in_order_of_first_appearance(tmp_path):
    from leanfit.core.io import atomic_write_csv

    path = atomic_write_csv(tmp_path / "rows.csv", [{"a": 1, "b": 2.5}, {"b": 3, "c": "x"}])
    assert path.read_text() == "a,b,c\n1,2.5,\n,3,x\n"
    assert atomic_write_csv(tmp_path / "empty.csv", []).read_text() == "\n"


def test_read_csv_reads_back_what_atomic_write_csv_wrote(tmp_path):
    from leanfit.core.io import atomic_write_csv, read_csv

    rows = [{"method": "a,b", "ratio": 1.5}, {"method": "c", "ratio": 2}]
    assert read_csv(atomic_write_csv(tmp_path / "r.csv", rows)) == [{"method": "a,b", "ratio": "1.5"},
                                                                     {"method": "c", "ratio": "2"}]
