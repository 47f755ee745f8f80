"""README.md and docs/ stay in sync with the code: the generated knob table, the counted code size,
every log line documented, the commands they tell users to run, their links and record labels
(the values behind the log labels: tests/test_boundaries.py)."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
import pack_code  # noqa: E402
import readme_knobs  # noqa: E402
import train_gpt  # noqa: E402

README = (REPO / "README.md").read_text(encoding="utf-8")
KNOBS = (REPO / "docs" / "knobs.md").read_text(encoding="utf-8")
LOGS = (REPO / "docs" / "logs.md").read_text(encoding="utf-8")
DOCS = [REPO / "README.md", REPO / "data" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_knob_table_is_current():
    assert readme_knobs.readme_table(KNOBS) == readme_knobs.knob_table(), (
        "docs/knobs.md knob table is stale; run: python3 tools/readme_knobs.py --write")


def test_counted_code_size_is_current():
    assert readme_knobs.readme_code_size(README) == f"{len(pack_code.pack_source((REPO / 'train_gpt.py').read_bytes(), train_gpt.Hyperparameters())):,}", (
        "README.md's counted code size is stale; run: python3 tools/readme_knobs.py --write")


def test_log_lines_documented_are_the_ones_written():
    """Every `log(f"<head>...` line train_gpt.py writes has a row in docs/logs.md starting with that head."""
    src = (REPO / "train_gpt.py").read_text(encoding="utf-8")
    heads = {re.match(r"[a-z_]+(?::| |$)", m).group(0).strip() for m in re.findall(r'\blog\(f?"([a-z_][^"{]*)', src)}
    rows = re.findall(r"^\| `([^`]*)`", LOGS, re.M)
    missing = [h for h in sorted(heads) if not any(r.startswith(h) for r in rows)]
    assert not missing, missing


def test_no_reference_to_documents_outside_the_repository():
    needle = re.compile(r"\bS" + r"PEC\b")  # split so this file does not match itself
    files = DOCS + [REPO / "train_gpt.py", *REPO.glob("tools/*.py"), *REPO.glob("data/*.py"), *REPO.glob("tests/*.py")]
    hits = [f"{f.relative_to(REPO)}:{i}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1)
            if needle.search(line)]
    assert not hits, hits


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_and_anchors_resolve():
    bad = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                bad.append(f"{doc.name}: {target}")
            elif anchor and anchor not in {_slug(h) for h in re.findall(r"^#+ (.*)$", dest.read_text(), re.M)}:
                bad.append(f"{doc.name}: {target} (no such heading)")
    assert not bad, bad


def test_every_record_label_is_defined_in_the_lineage_table():
    """A label such as 04-09 used in the README, docs or train_gpt.py has a row (folder, PR, score)."""
    table = README[README.index("## Lineage and credits"):]
    rows = {m.group(1).strip("* ") for m in re.finditer(r"^\| ([^|]+) \| `?[^|]*\| (?:#\d+|–) \| \**1\.\d+", table, re.M)}
    label = re.compile(r"(?<![\w-])0[1-9]-[0-3]\d(?![\w-])")
    used = {m for f in DOCS + [REPO / "train_gpt.py"] for m in label.findall(f.read_text(encoding="utf-8"))}
    assert used and used <= rows, sorted(used - rows)


def _commands(text: str) -> list[list[str]]:
    """`python3 <script> ...` commands in the fenced bash blocks, split into words (continuations joined)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            m = re.search(r"\bpython3 ((?:tools|data)/\w+\.py)(.*?)(?:#|$)", line)
            if m:
                out.append([m.group(1), *m.group(2).split()])
    return out


FLAG_CHECKED = {"tools/records.py", "tools/significance.py", "tools/plot_runs.py", "data/download_fineweb.py"}  # no torch import


def test_readme_commands_use_existing_tools_and_flags():
    cmds = _commands(README)
    assert any(c[0] == "tools/records.py" and c[1] == "pack" for c in cmds)
    assert any(c[0] == "tools/significance.py" and "--reference" in c for c in cmds)
    for c in cmds:
        assert (REPO / c[0]).is_file(), c
    cmds = [c for c in cmds if c[0] in FLAG_CHECKED]
    keys = list(dict.fromkeys((c[0], *([c[1]] if c[0] == "tools/records.py" else [])) for c in cmds))
    procs = {k: subprocess.Popen([sys.executable, str(REPO / k[0]), *k[1:], "--help"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
             for k in keys}  # in parallel: several import torch
    helps = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (k, err[-500:])
        helps[k] = out
    for c in cmds:
        key = (c[0], *([c[1]] if c[0] == "tools/records.py" else []))
        for flag in (w.split("=")[0] for w in c if w.startswith("--")):
            assert flag in helps[key], (c, flag)
