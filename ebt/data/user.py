"""Users' own text: local files and folders, or a Hugging Face dataset. Everything streams."""

import json
from pathlib import Path

from ebt.errors import DataError

TEXT_EXTS = (".txt", ".md")
JSON_EXTS = (".jsonl", ".json")
PARQUET_EXTS = (".parquet",)
SUPPORTED = TEXT_EXTS + JSON_EXTS + PARQUET_EXTS


def _files(paths):
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p} does not exist; check the path given to --files")
        if p.is_dir():
            # sorted so the document order (and so the split) is the same on every machine
            for f in sorted(p.rglob("*")):
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts):
                    yield f
        else:
            yield p


def _text_file(path):
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); convert it, e.g. "
                        f"`iconv -f latin1 -t utf-8 {path} > {path}.utf8`") from e


def _field(obj, path, where, text_field):
    if not isinstance(obj, dict) or text_field not in obj:
        keys = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{path}{where} has no field {text_field!r} (found {keys}); "
                        f"pass the right one with --text-field NAME")
    value = obj[text_field]
    if value is not None and not isinstance(value, str):
        raise DataError(f"{path}{where}: field {text_field!r} is {type(value).__name__}, not text; "
                        f"pass a text field with --text-field NAME")
    return value


def _json_file(path, text_field):
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if path.suffix == ".json" and head.startswith("["):  # a JSON array, not JSON lines
            for i, obj in enumerate(json.load(f)):
                yield _field(obj, path, f" item {i}", text_field)
            return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n} is not valid JSON ({e}); expected one JSON object "
                                f"per line with a {text_field!r} field") from e
            yield _field(obj, path, f":{n}", text_field)


def _parquet_file(path, text_field):
    import pyarrow.parquet as pq

    parquet_file = pq.ParquetFile(path)
    names = parquet_file.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path} has no column {text_field!r} (columns: {names[:10]}); "
                        f"pass the right one with --text-field NAME")
    # one row group at a time: a multi-GB file never has to fit in memory
    for group in range(parquet_file.num_row_groups):
        yield from parquet_file.read_row_group(group, columns=[text_field]).column(0).to_pylist()


def iter_user_documents(paths, text_field="text"):
    """Yield the text of every document in the given files/folders (folders are read recursively).

    .txt/.md: one document per file; .jsonl/.json: one per line (field text_field);
    .parquet: one per row (column text_field). Empty documents are skipped.
    """
    for path in _files(paths):
        ext = path.suffix.lower()
        if ext in TEXT_EXTS:
            docs = [_text_file(path)]
        elif ext in JSON_EXTS:
            docs = _json_file(path, text_field)
        elif ext in PARQUET_EXTS:
            docs = _parquet_file(path, text_field)
        else:
            raise DataError(f"{path}: unsupported file type {ext or '(none)'!r}; supported: "
                            f"{', '.join(SUPPORTED)}. Convert it or move it out of the folder")
        for text in docs:
            if text and text.strip():
                yield text


def iter_hf_documents(name, split="train", text_field="text", config=None, streaming=True,
                      data_files=None, limit=None):
    """Yield texts from a Hugging Face dataset: a hub name ("HuggingFaceFW/fineweb") or a local
    builder ("json", "parquet", "text") with data_files. Streams by default, so `limit` documents
    are read without downloading the whole dataset."""
    try:
        import datasets
    except ImportError as e:
        raise DataError("reading Hugging Face datasets needs the `datasets` package: "
                        "pip install 'ebt[hf]'") from e
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming,
                                   data_files=data_files)
    except Exception as e:  # not found, offline, bad config/split: all end here
        raise DataError(f"could not load Hugging Face dataset {name!r} (config={config}, "
                        f"split={split}): {type(e).__name__}: {e}. Check the name, config and "
                        f"split, and that the hub is reachable; or use local files with --files") from e
    cols = getattr(ds, "column_names", None)
    if cols and text_field not in cols:
        raise DataError(f"dataset {name!r} has no column {text_field!r} (columns: {cols[:10]}); "
                        f"pass the right one with --text-field NAME")
    n = 0
    for row in ds:
        if limit is not None and n >= limit:
            break
        text = _field(row, name, f" (split {split})", text_field)
        if text and text.strip():
            n += 1
            yield text
