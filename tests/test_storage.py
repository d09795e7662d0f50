import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from lmforge import storage


@pytest.fixture(params=["local", "file", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    if request.param == "file":
        return "file://" + str(tmp_path / "out")
    return f"memory://bucket/{request.node.name}"


def test_round_trip_list_and_remove(root):
    storage.write_text(storage.join(root, "a", "x.txt"), "hello")
    storage.write_json(storage.join(root, "b.json"), {"k": 1})
    assert storage.read_text(storage.join(root, "a", "x.txt")) == "hello"
    assert storage.read_json(storage.join(root, "b.json")) == {"k": 1}
    files = storage.list_files(root)
    assert [f.rsplit("/", 1)[-1] for f in files] == ["x.txt", "b.json"] or sorted(files) == files
    assert len(storage.list_files(root, suffix=".txt")) == 1
    storage.remove(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a", "x.txt"))
    with pytest.raises(FileNotFoundError):
        storage.read_text(storage.join(root, "a", "x.txt"))


def test_success_marker(root):
    assert not storage.is_complete(root)
    storage.write_text(storage.join(root, "part-0.txt"), "data")
    assert not storage.is_complete(root)
    storage.mark_success(root, {"rows": 3})
    assert storage.is_complete(root)
    assert storage.read_json(storage.join(root, storage.SUCCESS))["rows"] == 3


def test_exception_inside_atomic_writer_leaves_nothing(root):
    target = storage.join(root, "f.bin")
    storage.write_bytes(target, b"old")
    with pytest.raises(RuntimeError), storage.atomic_writer(target) as f:
        f.write(b"new partial")
        raise RuntimeError("boom")
    assert storage.read_bytes(target) == b"old"
    assert [p for p in storage.list_files(root) if ".tmp-" in p] == []


def test_killed_writer_leaves_no_partial_file_under_final_name(tmp_path):
    """A process killed mid-write (SIGKILL: no cleanup runs) leaves the old file or none."""
    target = tmp_path / "big.bin"
    script = textwrap.dedent(f"""
        import os, sys
        from lmforge import storage
        with storage.atomic_writer({str(target)!r}) as f:
            f.write(b"x" * 1_000_000)
            f.flush()
            print("writing", flush=True)
            sys.stdin.read()  # block until killed
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert all(name.startswith(".tmp-big.bin-") for name in leftovers) and len(leftovers) == 1


def test_join_and_locality():
    assert storage.join("s3://b/p/", "x", "y") == "s3://b/p/x/y"
    assert storage.join("runs", "x") == os.path.join("runs", "x")
    assert storage.is_local("runs/x") and storage.is_local("file:///tmp/x")
    assert not storage.is_local("s3://b/x") and not storage.is_local("gs://b/x")


def test_bad_uri_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot open storage URI 'nosuchscheme://x'"):
        storage.resolve("nosuchscheme://x")


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask_as_open_does(tmp_path, mask, mode):
    """An export or a report on a shared volume must be readable as the umask allows, not
    0600 (what tempfile.mkstemp gives)."""
    old = os.umask(mask)
    try:
        storage.write_text(str(tmp_path / "a" / "report.json"), "{}")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "report.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == mode
    assert os.umask(old) == old  # reading the umask left it as it was
