"""Where documents come from: every file of every source, listed before any work starts.

`resolve_sources` turns the configured sources (local paths, globs, URIs, `hf:` hub datasets,
the built-in corpus) into a list of {path, relpath, format} per source; a missing or
unreadable path is a one-line error. data/readers.py reads each listed file into rows.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
import sys
from typing import Any

from lmforge import LmforgeError, storage
from lmforge.builtin import corpus
from lmforge.data.config import SourceConfig

EXTENSIONS = {
    ".txt": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
    ".html": "html",
    ".htm": "html",
    ".warc": "warc",
}
_HF_METADATA = {"state.json", "dataset_info.json", "dataset_dict.json"}
COMPRESSION = (".gz", ".zst", ".zstd", ".bz2", ".lz4")


def file_format(path: str, declared: str) -> str | None:
    if declared != "auto":
        return declared
    base = path
    for ext in COMPRESSION:
        base = base.removesuffix(ext)
    return EXTENSIONS.get(os.path.splitext(base)[1].lower())


def resolve_sources(sources: list[SourceConfig]) -> list[list[dict[str, Any]]]:
    """Per source, its files as {path, relpath, format}; raises LmforgeError naming a bad path."""
    out = []
    for i, src in enumerate(sources):
        where = f"sources[{i}] ({src.path})"
        if src.is_builtin:
            if src.path != "builtin:python-docs":
                raise LmforgeError(
                    f"{where}: unknown built-in corpus; the one built in is builtin:python-docs"
                )
            out.append(
                [
                    {"path": "builtin:python-docs", "relpath": r, "format": "builtin"}
                    for r in corpus.python_docs_files()
                ]
            )
            continue
        if src.path.startswith("hf:"):
            out.append(_hub_dataset_files(src, where))
            continue
        try:
            files = _list_source(src.path)
        except (OSError, ValueError) as e:
            raise LmforgeError(f"{where}: cannot read: {e}") from None
        items = []
        for path, rel in files:
            fmt = file_format(path, src.format)
            if fmt is not None:
                items.append({"path": path, "relpath": rel, "format": fmt})
        if not items:
            raise LmforgeError(
                f"{where}: no readable input files (.txt, .jsonl, .json, .parquet, .csv, .arrow, optionally .gz/.zst); check the path"
            )
        for item in items:
            _check_readable(item["path"], where)
        if any(item["format"] in ("html", "warc") for item in items):
            _check_web_extra(where)
        out.append(items)
    return out


def _hub_dataset_files(src: SourceConfig, where: str) -> list[dict[str, Any]]:
    """`hf:NAME`: load the dataset into the Hugging Face cache (on this, the driver's, machine),
    then read its cache files like any .arrow source. On a multi-node cluster the cache must be
    on storage every node sees (HF_HOME on a shared volume), or `save_to_disk` it to a bucket."""
    try:
        import datasets
    except ImportError:
        raise LmforgeError(
            f"{where}: Hugging Face hub datasets need the `datasets` package: pip install 'lmforge[hf]'"
        ) from None
    name = src.path.removeprefix("hf:")
    revision = _hub_revision(name, src.hf_revision, where)
    try:
        ds = datasets.load_dataset(name, src.hf_config, split=src.hf_split, revision=revision)
    except Exception as e:  # the hub, the network, a bad name or split: all one line to the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LmforgeError(
            f"{where}: cannot load dataset {name!r} (config {src.hf_config}, split {src.hf_split!r}): {first}"
        ) from None
    files = [c["filename"] for c in getattr(ds, "cache_files", [])]
    if not files:
        raise LmforgeError(
            f"{where}: dataset {name!r} has no cache files to read (an in-memory dataset)"
        )
    relpath = f"{name}/{src.hf_split}/"
    return [
        {
            "path": f,
            "relpath": relpath + posixpath.basename(f),
            "format": "arrow",
            "revision": revision,
        }
        for f in files
    ]


def _hub_revision(name: str, asked: str | None, where: str) -> str | None:
    """The commit sha an `hf:` source is read at: `asked` when it is one, else what the hub
    says `asked` (a branch or tag; unset: the default branch) points at now, so the load and the
    manifest name one commit. Unpinned reads are warned about: a rerun of the same config (the
    same output hash) may read other data."""
    if asked and re.fullmatch(r"[0-9a-f]{40}", asked):
        return asked
    try:
        from huggingface_hub import HfApi

        sha = HfApi().dataset_info(name, revision=asked).sha
    except Exception as e:  # offline, a bad name or revision: load_dataset says which
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(
            f"[data] warning: {where}: cannot look up the commit of dataset {name!r}"
            f"{f' at {asked!r}' if asked else ''} ({first}); reading it unpinned",
            file=sys.stderr,
            flush=True,
        )
        return asked
    print(
        f"[data] warning: {where}: hf_revision is {asked or 'not set'}, so this reads commit "
        f"{sha}, the current one; set hf_revision: {sha} so a rerun reads the same data",
        file=sys.stderr,
        flush=True,
    )
    return sha


def hub_revisions(
    sources: list[SourceConfig], files: list[list[dict[str, Any]]]
) -> dict[str, str | None]:
    """Each `hf:` source's path -> the commit it was read at (resolve_sources' `files`)."""
    return {
        src.path: items[0]["revision"]
        for src, items in zip(sources, files, strict=True)
        if src.path.startswith("hf:") and items
    }


def _list_source(path: str) -> list[tuple[str, str]]:
    import pyarrow.fs as pafs

    if any(ch in path for ch in "*?["):
        base = path
        while any(ch in base for ch in "*?["):
            base = base.rsplit("/", 1)[0] if "/" in base else "."
        pattern = path
        files = storage.list_files(base)
        return [
            (f, _rel(f, base))
            for f in files
            if fnmatch.fnmatch(f, pattern)
            or fnmatch.fnmatch(os.path.abspath(f), os.path.abspath(pattern))
        ]
    fs, inner = storage.resolve(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or directory: {path}")
    if info.type == pafs.FileType.Directory:
        files = [(f, _rel(f, path)) for f in storage.list_files(path) if not _hidden(f)]
        if any(f.endswith(".arrow") for f, _ in files):
            # a Hugging Face `save_to_disk` folder: its JSON files describe the data, not hold it
            files = [(f, r) for f, r in files if posixpath.basename(r) not in _HF_METADATA]
        return files
    return [(path, posixpath.basename(inner))]


def _rel(path: str, base: str) -> str:
    return posixpath.relpath(path, base) if storage.is_uri(base) else os.path.relpath(path, base)


def _hidden(path: str) -> bool:
    return any(part.startswith((".", "_")) for part in path.replace("\\", "/").split("/")[-1:])


def _check_web_extra(where: str) -> None:
    try:
        import trafilatura  # noqa: F401
        import warcio  # noqa: F401
    except ImportError as e:
        raise LmforgeError(
            f"{where}: reading .html/.warc files needs the web extra "
            f"(pip install 'lmforge[web]': trafilatura, warcio): {e}"
        ) from None


def _check_readable(path: str, where: str) -> None:
    if storage.is_local(path) and not os.access(storage.local_path(path), os.R_OK):
        raise LmforgeError(f"{where}: file is not readable (permissions): {path}")
