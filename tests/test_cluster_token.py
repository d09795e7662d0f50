"""The local Ray token file: created private, and refused when other users can read it."""

from __future__ import annotations

import stat

import pytest

from lmforge import LmforgeError
from lmforge.cluster.local import ensure_token


@pytest.fixture
def token_file(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    path = tmp_path / "ray" / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    return path


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_token_is_private(token_file):
    token = ensure_token()
    assert len(token) == 64 and token_file.read_text() == token
    assert mode(token_file) == 0o600 and mode(token_file.parent) == 0o700
    assert ensure_token() == token  # kept


@pytest.mark.parametrize("readable", [0o640, 0o604, 0o666])
def test_a_token_others_can_read_is_refused(token_file, readable):
    token_file.parent.mkdir()
    token_file.write_text("a" * 64)
    token_file.chmod(readable)
    with pytest.raises(LmforgeError, match=f"mode {readable:04o}.*chmod 600 {token_file}"):
        ensure_token()


def test_an_empty_token_file_is_refilled_privately(token_file):
    token_file.parent.mkdir()
    token_file.write_text("")
    token_file.chmod(0o600)
    token = ensure_token()
    assert token_file.read_text() == token and mode(token_file) == 0o600


def test_the_token_in_the_environment_wins(token_file, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert ensure_token() == "from-env" and not token_file.exists()
