#!/usr/bin/env python3
"""Generate the README table of env knobs from train_gpt.Hyperparameters.

Every dataclass field becomes one row: env var (field name upper-cased), default (from the
dataclass) and meaning (the trailing `# ...` comment on the field's line in train_gpt.py, or the
section name from the `# --- section ---` header above it, in italics, when the field has no comment).
Rows are grouped under bold section rows in source order.

    python3 tools/readme_knobs.py           # print the table
    python3 tools/readme_knobs.py --write   # replace the table between the markers in README.md
    python3 tools/readme_knobs.py --check   # exit 1 if README.md is stale
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
START, END = "<!-- knobs:start -->", "<!-- knobs:end -->"
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


def readme_table(text: str) -> str:
    """The text between the knob markers of README.md, stripped."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"README.md must contain exactly one {START} ... {END} block")
    return text[text.index(START) + len(START) : text.index(END)].strip()


def render_readme(text: str, table: str) -> str:
    readme_table(text)  # validates the markers
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="update the table in README.md")
    mode.add_argument("--check", action="store_true", help="exit 1 if README.md's table is stale")
    args = p.parse_args(argv)
    table = knob_table()
    if not (args.write or args.check):
        print(table)
        return 0
    try:
        text = README.read_text(encoding="utf-8")
        current = readme_table(text)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.check:
        if current != table:
            print("README.md knob table is stale; run: python3 tools/readme_knobs.py --write", file=sys.stderr)
            return 1
        return 0
    if current != table:
        README.write_text(render_readme(text, table), encoding="utf-8")
        print("README.md knob table updated")
    bare = uncommented_fields()
    if bare:
        print(f"note: no trailing comment (meaning = section name): {', '.join(bare)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
