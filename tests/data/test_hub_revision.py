"""`hf:` sources are read at one commit, named in the manifest: a pinned sha as is, a branch,
tag or nothing resolved to the commit it points at now (with a warning that names it), and a
lookup that fails (offline) warned about. Stand-ins for `datasets` and the hub: no network."""

from __future__ import annotations

import sys
import types

import pyarrow as pa
import pytest

from lmforge.data.config import SourceConfig
from lmforge.data.sources import hub_revisions, resolve_sources

SHA = "0123456789abcdef0123456789abcdef01234567"
HEAD = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """Stand-ins: load_dataset records the revision it was asked for; the hub resolves
    `main` (and no revision) to HEAD, and fails for unknown revisions."""
    cache = tmp_path / "data.arrow"
    table = pa.table({"text": ["a document"]})
    with pa.OSFile(str(cache), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    loads, lookups = [], []

    def load_dataset(name, config=None, split=None, revision=None):
        loads.append(revision)
        return types.SimpleNamespace(cache_files=[{"filename": str(cache)}])

    class HfApi:
        def dataset_info(self, name, revision=None):
            lookups.append(revision)
            if revision not in (None, "main"):
                raise ValueError(f"Revision Not Found for url: .../{name}/revision/{revision}")
            return types.SimpleNamespace(sha=HEAD)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=HfApi))
    return loads, lookups


def test_a_pinned_sha_is_read_as_is_without_a_warning(hub, capsys):
    loads, lookups = hub
    src = SourceConfig(path="hf:org/corpus", hf_revision=SHA)
    files = resolve_sources([src])
    assert loads == [SHA] and lookups == []  # no hub round trip for a sha
    assert hub_revisions([src], files) == {"hf:org/corpus": SHA}
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("asked", [None, "main"])
def test_an_unpinned_source_reads_the_current_commit_and_says_so(hub, capsys, asked):
    loads, _ = hub
    src = SourceConfig(path="hf:org/corpus", hf_revision=asked)
    files = resolve_sources([src])
    assert loads == [HEAD]  # the load is pinned to the commit the manifest names
    assert hub_revisions([src], files) == {"hf:org/corpus": HEAD}
    err = capsys.readouterr().err
    assert f"reads commit {HEAD}" in err and f"set hf_revision: {HEAD}" in err


def test_a_failed_lookup_reads_unpinned_with_a_warning(hub, capsys):
    loads, _ = hub
    src = SourceConfig(path="hf:org/corpus", hf_revision="v2")
    files = resolve_sources([src])
    assert loads == ["v2"] and hub_revisions([src], files) == {"hf:org/corpus": "v2"}
    assert "cannot look up the commit of dataset 'org/corpus' at 'v2'" in capsys.readouterr().err


def test_local_sources_have_no_revision(tmp_path, hub):
    (tmp_path / "a.txt").write_text("local text\n")
    local, remote = SourceConfig(path=str(tmp_path)), SourceConfig(path="hf:org/corpus")
    files = resolve_sources([local, remote])
    assert hub_revisions([local, remote], files) == {"hf:org/corpus": HEAD}
