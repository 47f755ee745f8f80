"""Reading the input documents and the argument types that data/build_shards.py and data/train_tokenizer.py share.

Both scripts import this module; neither imports the other at import time.
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

PathLike = str | os.PathLike


def check_input_path(path: Path) -> None:
    """A readable .jsonl or .txt input, else FileNotFoundError or ValueError saying what to give."""
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}; check the --input path")
    if path.suffix not in (".jsonl", ".txt"):
        raise ValueError(
            f"unsupported input {path}: use .jsonl (one JSON object with a \"text\" field per line) "
            "or .txt (one document per file)"
        )


def iter_documents(paths: Iterable[PathLike]) -> Iterator[str]:
    """Yield document texts from .jsonl files (field "text") or .txt files (one document each)."""
    for raw_path in paths:
        path = Path(raw_path)
        check_input_path(path)
        if path.suffix == ".txt":
            try:
                yield path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8") from None
            continue
        # Binary lines split on b"\n" only, so stray \r or U+2028 inside a record
        # cannot break it apart and the reported line numbers match `sed -n`.
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    reason = e.msg if isinstance(e, json.JSONDecodeError) else "not valid UTF-8"
                    raise ValueError(f"{path}:{lineno}: malformed JSON ({reason}); fix or remove that line") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(
                        f"{path}:{lineno}: record has no string \"text\" field; each line must be an object like {{\"text\": \"...\"}}"
                    )
                yield record["text"]


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n
