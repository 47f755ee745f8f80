#!/usr/bin/env python3
"""Are docs/knobs.md's knob table and README.md's counted code size current? `python3 tools/readme_knobs.py --write` rewrites them.

Generate the knob table of docs/knobs.md from train_gpt.Hyperparameters, and README.md's counted code size.

Every dataclass field becomes one row: env var (field name upper-cased), default (from the
dataclass) and meaning (the trailing `# ...` comment on the field's line in train_gpt.py, or the
section name from the `# --- section ---` header above it, in italics, when the field has no comment).
Rows are grouped under bold section rows in source order. README.md states the size of the packed
train_gpt.py (what the artifact counts) between code-size markers.

    python3 tools/readme_knobs.py           # print the table
    python3 tools/readme_knobs.py --write   # rewrite the table in docs/knobs.md and the size in README.md
    python3 tools/readme_knobs.py --check   # exit 1 if either is stale
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import re
import sys
import tokenize
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_gpt.py"
README = REPO / "README.md"
KNOBS_DOC = REPO / "docs" / "knobs.md"
START, END = "<!-- knobs:start -->", "<!-- knobs:end -->"
SIZE_START, SIZE_END = "<!-- code-size:start -->", "<!-- code-size:end -->"
SECTION_RE = re.compile(r"#\s*-+\s*(.*?)\s*-+\s*$")  # applied to comment tokens only: "# --- model ---"


class Knob(NamedTuple):
    name: str
    section: str
    comment: str  # "" when the field's line has no trailing comment


def _import_train_gpt():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import train_gpt

    return train_gpt


def parse_knobs(source: str) -> list[Knob]:
    """Fields of the Hyperparameters class in source order, with their section and trailing comment."""
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Hyperparameters")
    comments: dict[int, tuple[int, str]] = {}  # line -> (column, text) of the comment token on it
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string)
    lines = source.splitlines()
    sections = []  # (line, name) of section headers inside the class body
    for line in range(cls.lineno, cls.end_lineno + 1):
        if line in comments:
            col, text = comments[line]
            m = SECTION_RE.match(text)
            if m and not lines[line - 1][:col].strip():  # a comment on a line of its own
                sections.append((line, m.group(1)))
    knobs = []
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        section = next((name for line, name in reversed(sections) if line < node.lineno), "")
        _, text = comments.get(node.end_lineno, (0, ""))
        knobs.append(Knob(node.target.id, section, text.lstrip("#").strip()))
    return knobs


def format_default(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '""' if value == "" else value
    return repr(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def knob_table() -> str:
    """The markdown knob table (no trailing newline)."""
    tg = _import_train_gpt()
    defaults = {f.name: f.default for f in dataclasses.fields(tg.Hyperparameters)}
    knobs = parse_knobs(SCRIPT.read_text(encoding="utf-8"))
    missing = set(defaults) - {k.name for k in knobs}
    if missing:
        raise RuntimeError(f"fields not found in the source of Hyperparameters: {sorted(missing)}")
    rows = ["| env var | default | meaning |", "|---|---|---|"]
    section = None
    for k in knobs:
        if k.section != section:
            section = k.section
            rows.append(f"| **{_cell(section or 'other')}** | | |")
        meaning = k.comment or f"*{section or 'other'}*"  # no comment: the section name, in italics
        rows.append(f"| `{k.name.upper()}` | `{_cell(format_default(defaults[k.name]))}` | {_cell(meaning)} |")
    return "\n".join(rows)


def uncommented_fields() -> list[str]:
    """Fields whose line has no trailing comment (their meaning falls back to the section name)."""
    return [k.name for k in parse_knobs(SCRIPT.read_text(encoding="utf-8")) if not k.comment]


def _between(text: str, start: str, end: str, what: str) -> str:
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{what} must contain exactly one {start} ... {end} block")
    return text[text.index(start) + len(start) : text.index(end)].strip()


def _replace(text: str, start: str, end: str, body: str) -> str:
    head, rest = text.split(start, 1)
    return f"{head}{start}{body}{end}{rest.split(end, 1)[1]}"


def readme_table(text: str) -> str:
    """The text between the knob markers (of docs/knobs.md), stripped."""
    return _between(text, START, END, "docs/knobs.md")


def render_readme(text: str, table: str) -> str:
    readme_table(text)  # validates the markers
    return _replace(text, START, END, f"\n{table}\n")


def code_size_text() -> str:
    """The counted code size of the default config as README.md states it, e.g. '33,545'."""
    tg = _import_train_gpt()
    return f"{tg.counted_code_bytes(tg.Hyperparameters())[0]:,}"


def readme_code_size(text: str) -> str:
    return _between(text, SIZE_START, SIZE_END, "README.md")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="update docs/knobs.md and README.md")
    mode.add_argument("--check", action="store_true", help="exit 1 if either is stale")
    args = p.parse_args(argv)
    table, size = knob_table(), code_size_text()
    if not (args.write or args.check):
        print(table)
        return 0
    try:
        doc, readme = KNOBS_DOC.read_text(encoding="utf-8"), README.read_text(encoding="utf-8")
        stale_table, stale_size = readme_table(doc) != table, readme_code_size(readme) != size
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.check:
        if stale_table or stale_size:
            print("docs/knobs.md or README.md's code size is stale; run: python3 tools/readme_knobs.py --write",
                  file=sys.stderr)
            return 1
        return 0
    if stale_table:
        KNOBS_DOC.write_text(render_readme(doc, table), encoding="utf-8")
        print("docs/knobs.md knob table updated")
    if stale_size:
        README.write_text(_replace(readme, SIZE_START, SIZE_END, size), encoding="utf-8")
        print(f"README.md counted code size updated: {size} bytes")
    bare = uncommented_fields()
    if bare:
        print(f"note: no trailing comment (meaning = section name): {', '.join(bare)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
