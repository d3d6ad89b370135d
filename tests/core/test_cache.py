"""Hash-verified cache folders: manifest contents, corruption detection, rebuilds, failed builds, concurrency."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest

from leanfit.core.cache import MANIFEST, cache_dir, cached_folder, verify_folder

_FILES = {"weights.bin": bytes(range(256)) * 4, "sub/config.json": b'{"d": 32}\n'}


class Builder:
    """Writes ``_FILES`` into the folder it is given and counts its calls."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay

    def __call__(self, tmp: Path) -> None:
        self.calls += 1
        time.sleep(self.delay)
        for rel, data in _FILES.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, Builder]:
    build = Builder()
    path = cached_folder(tmp_path / "entry", build, meta={"source": "test", "size": 3})
    return path, build


def test_manifest_records_sha256_of_every_file_and_meta(tmp_path, built):
    path, build = built
    assert path == tmp_path / "entry"
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest == {
        "meta": {"source": "test", "size": 3},
        "files": {rel: hashlib.sha256(data).hexdigest() for rel, data in sorted(_FILES.items())},
    }
    assert {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} == {*_FILES, MANIFEST}
    assert build.calls == 1


def test_intact_entry_is_reused_without_building(built):
    path, build = built
    mtime = (path / "weights.bin").stat().st_mtime_ns
    assert cached_folder(path, build) == path
    assert build.calls == 1
    assert (path / "weights.bin").stat().st_mtime_ns == mtime


def _flip_byte(path: Path) -> None:
    data = bytearray((path / "weights.bin").read_bytes())
    data[100] ^= 0xFF
    (path / "weights.bin").write_bytes(bytes(data))


def _set_manifest(path: Path, text: str) -> None:
    (path / MANIFEST).write_text(text)


@pytest.mark.parametrize(
    "corrupt",
    [
        _flip_byte,
        lambda p: (p / "sub" / "config.json").unlink(),
        lambda p: (p / "extra.txt").write_text("not in the manifest"),
        lambda p: (p / "sub" / "config.json").write_bytes(b""),
        lambda p: (p / MANIFEST).unlink(),
        lambda p: _set_manifest(p, "{not json"),
        lambda p: _set_manifest(p, '{"meta": {}}'),
        lambda p: _set_manifest(p, '{"meta": {}, "files": {}}'),
    ],
    ids=["changed-byte", "deleted-file", "extra-file", "emptied-file", "no-manifest", "manifest-not-json",
         "manifest-without-files", "manifest-empty-files"],
)
def test_corruption_is_detected_and_entry_rebuilt(built, corrupt):
    path, build = built
    assert verify_folder(path)
    corrupt(path)
    assert not verify_folder(path)
    assert cached_folder(path, build) == path
    assert build.calls == 2
    assert verify_folder(path)
    assert {rel: (path / rel).read_bytes() for rel in _FILES} == _FILES
    assert not (path / "extra.txt").exists()  # the rebuild starts from an empty folder


@pytest.mark.parametrize("name", ["absent", "empty-folder"], ids=["absent", "empty-folder"])
def test_verify_folder_without_manifest_is_false(tmp_path, name):
    if name == "empty-folder":
        (tmp_path / name).mkdir()
    assert verify_folder(tmp_path / name) is False


def test_failed_build_leaves_nothing_behind_and_next_call_builds(tmp_path):
    def failing(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"partial")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError, match="killed mid-build"):
        cached_folder(tmp_path / "entry", failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.lock"]
    build = Builder()
    cached_folder(tmp_path / "entry", build)
    assert build.calls == 1 and verify_folder(tmp_path / "entry")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry", "entry.lock"]


def test_concurrent_callers_build_once(tmp_path):
    build = Builder(delay=0.3)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(cached_folder(tmp_path / "entry", build))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert build.calls == 1
    assert results == [tmp_path / "entry"] * 4
    assert verify_folder(tmp_path / "entry")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"LEANFIT_CACHE": "/x/lf", "XDG_CACHE_HOME": "/y"}, "/x/lf/models/m"),
        ({"LEANFIT_CACHE": "", "XDG_CACHE_HOME": "/y"}, "/y/leanfit/models/m"),
        ({"HOME": "/home/u"}, "/home/u/.cache/leanfit/models/m"),
    ],
    ids=["leanfit-cache", "xdg", "home"],
)
def test_cache_dir_reads_environment_at_call_time(monkeypatch, env, expected):
    for var in ("LEANFIT_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert cache_dir("models", "m") == Path(expected)
