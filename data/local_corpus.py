#!/usr/bin/env python3
"""Build a small dataset, offline, from the documentation that ships with the Python installation.

What ./run.sh trains on without a GPU when neither DATA_PATH nor ../shared/data is there. The documents are
  - each help() topic of pydoc_data/topics.py (the language reference),
  - the docstrings of each standard-library module (module, classes, functions, in source order),
  - the standard library's .txt and .rst files,
leaving out tests and site-packages. They are ordered by a hash of their source name, so the
validation split (the first --val-docs documents) mixes all three kinds, and the result depends
only on the Python installation. A SentencePiece tokenizer with the public settings is trained on
them unless --tokenizer is given. The dataset directory appears only once complete, so an
interrupted build starts over and a finished one is reused.

Example:
    python3 data/local_corpus.py            # data/datasets/pydocs_sp1024, data/tokenizers/pydocs_1024_bpe.model
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import build_shards
import train_tokenizer

DATA_DIR = Path(__file__).resolve().parent
SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
MIN_DOC_CHARS = 200  # shorter texts (one-line docstrings of tiny modules) carry almost no signal
VAL_FRACTION = 10  # 1 in 10 documents is validation unless --val-docs says otherwise


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def docstrings(source: bytes) -> str:
    """Module, class and function docstrings of one Python file in source order, blank-line separated."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    parts: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                parts.append(doc)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return "\n\n".join(parts)


def _sources(root: Path) -> Iterator[tuple[str, Callable[[], str]]]:
    """(source name, loader) for every candidate document, cheap to list, loaded lazily."""
    try:
        from pydoc_data import topics
    except ImportError:  # some distributions ship it separately
        topics = None
    for name in sorted(topics.topics) if topics else []:
        yield f"pydoc_data/topics.py:{name}", (lambda name=name: topics.topics[name])
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_PARTS]  # never walk into site-packages or tests
        for file in files:
            path = Path(folder, file)
            rel = path.relative_to(root).as_posix()
            if path.suffix == ".py" and rel != "pydoc_data/topics.py":
                yield rel, (lambda path=path: docstrings(path.read_bytes()))
            elif path.suffix in (".txt", ".rst"):
                yield rel, (lambda path=path: path.read_text(encoding="utf-8", errors="replace"))


def collect_documents(root: Path, max_docs: int | None = None) -> list[tuple[str, str]]:
    """(source name, text) pairs in a fixed order: sha256 of the source name.

    Sources are ordered before any is read, so max_docs also bounds the parsing time.
    """
    docs = []
    for name, load in sorted(_sources(root), key=lambda s: hashlib.sha256(s[0].encode()).digest()):
        text = load().strip()
        if len(text) >= MIN_DOC_CHARS:
            docs.append((name, text))
            if max_docs is not None and len(docs) == max_docs:
                break
    return docs


def describe(docs: Sequence[tuple[str, str]], root: Path) -> dict:
    kinds = {"pydoc_topics": 0, "module_docstrings": 0, "text_files": 0}
    for name, _ in docs:
        kind = "pydoc_topics" if name.startswith("pydoc_data/topics.py:") else "module_docstrings" if name.endswith(".py") else "text_files"
        kinds[kind] += 1
    return {"source": f"python-{sys.version.split()[0]} stdlib docs", "root": str(root), **kinds,
            "docs": len(docs), "bytes": sum(len(t.encode("utf-8")) for _, t in docs)}


def is_complete(out: Path, tokenizer: Path) -> bool:
    return tokenizer.is_file() and (out / "fineweb_val_000000.bin").is_file() and (out / "fineweb_train_000000.bin").is_file()


def build(
    out: Path,
    tokenizer: Path,
    vocab_size: int = 1024,
    val_docs: int | None = None,
    max_docs: int | None = None,
    root: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Build (or reuse) the dataset in out and its tokenizer; returns the source description.

    An existing tokenizer file is used as is; otherwise one of vocab_size pieces is trained.
    """
    root = root or stdlib_root()
    if is_complete(out, tokenizer):
        info = json.loads((out / "source.json").read_text(encoding="utf-8")) if (out / "source.json").is_file() else {}
        log(f"corpus reuse:{out} source:{info.get('source', 'unknown')}")
        return info
    if out.exists():
        raise ValueError(f"{out} exists but is incomplete or its tokenizer {tokenizer} is missing; remove {out} and run again")
    t0 = time.perf_counter()
    docs = collect_documents(root, max_docs)
    info = describe(docs, root)
    val_docs = val_docs or max(1, len(docs) // VAL_FRACTION)
    log("corpus " + " ".join(f"{k}:{v}" for k, v in info.items()) + f" val_docs:{val_docs} seconds:{time.perf_counter() - t0:.1f}")
    if len(docs) <= val_docs:
        raise ValueError(f"only {len(docs)} documents found under {root}, not enough for {val_docs} validation documents")

    if tokenizer.is_file():
        have = build_shards._load_tokenizer(tokenizer).vocab_size()
        if have != vocab_size:
            raise ValueError(f"tokenizer {tokenizer} has {have} pieces, not {vocab_size}; pass --vocab-size {have} or another --tokenizer")
        log(f"tokenizer reuse:{tokenizer}")
    else:
        # Whole documents: the 4192-byte default would skip most module docstrings.
        longest = max(len(t.encode("utf-8")) for _, t in docs)
        proto = train_tokenizer.train_tokenizer((t for _, t in docs), vocab_size, max_sentence_length=longest, log=log)
        train_tokenizer.save_model(proto, tokenizer)

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        corpus = tmp / "corpus.jsonl"
        with open(corpus, "w", encoding="utf-8") as f:
            for name, text in docs:
                f.write(json.dumps({"text": text, "source": name}, ensure_ascii=False) + "\n")
        summary = build_shards.build_shards([corpus], tokenizer, tmp, val_docs=val_docs, log=log)
        info.update({k: summary[k] for k in ("val_docs", "val_tokens", "train_docs", "train_tokens", "val_fingerprint")})
        info["tokenizer"] = str(tokenizer)
        (tmp / "source.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a small offline dataset from the Python installation's documentation.")
    parser.add_argument("--vocab-size", type=build_shards.positive_int, default=1024, help="pieces of the tokenizer trained on it")
    parser.add_argument("--out", help="dataset directory (default: data/datasets/pydocs_sp<V>)")
    parser.add_argument("--tokenizer", help="tokenizer to use, trained here if the file does not exist "
                                            "(default: data/tokenizers/pydocs_<V>_bpe.model)")
    parser.add_argument("--val-docs", type=build_shards.positive_int, default=None, help="leading documents used for validation (default: 1 in 10)")
    parser.add_argument("--max-docs", type=build_shards.positive_int, default=None, help="use only this many documents (test-size builds)")
    args = parser.parse_args(argv)
    out = Path(args.out or DATA_DIR / "datasets" / f"pydocs_sp{args.vocab_size}")
    tokenizer = Path(args.tokenizer or DATA_DIR / "tokenizers" / f"pydocs_{args.vocab_size}_bpe.model")
    try:
        build(out, tokenizer, args.vocab_size, args.val_docs, args.max_docs, log=lambda line: print(line, flush=True))
    except (OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"dataset:{out}")
    print(f"tokenizer:{tokenizer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
