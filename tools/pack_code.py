"""What does train_gpt.py count as its code? Writes its packed (shipped) form for the config in the environment.

    [PRESET=... KNOB=...] python3 tools/pack_code.py [--src train_gpt.py] --out records/.../train_gpt.py

The config is read as the run reads it (PRESET, then env vars), so set the same env as the run.
The wrapper (raw LZMA2 or brotli in a latin-1 string literal) runs shipped_source with exec: the
definitions and if-blocks that config cannot reach left out (PRUNE, dead_ifs), docstrings, comments
and unread annotations removed, functions, constants and locals renamed, whitespace squeezed. It runs
that config only: every knob but train_gpt.FREE_KNOBS is pinned to its packed value. Its size is what
the run logs as counted_code_bytes (code_packed:1): the readable train_gpt.py loads this file to count
itself. The readable file stays the source of truth. docs/evaluation.md describes each pass and
docs/benchmarks.md measures them against python-minifier's.
"""
from __future__ import annotations

import argparse
import ast
import builtins
import collections
import io
import itertools
import keyword
import lzma
import operator as op
import re
import string
import sys
import tokenize
from dataclasses import fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _module(h):
    """The train_gpt module h's config class comes from (train_gpt, or __main__ in a run): FREE_KNOBS, check_config."""
    return sys.modules[type(h).__module__]


def _default_config():
    sys.path.insert(0, str(REPO))
    import train_gpt

    return train_gpt.Hyperparameters()


# Self-extracting code: the shipped source, raw LZMA2 (the 04-09 record's wrapper) or brotli-11
# (PR #1855's), whichever is smaller, run with exec. The compressed bytes sit in a latin-1 string
# literal (PEP 263 coding line), which costs ~1% in escapes where base85 costs 25%.
PACK_HEADS = (b'#coding:l1\nimport lzma as L,linecache as C;s=L.decompress("""', b'#coding:l1\nimport brotli,linecache as C;s=brotli.decompress("""')
# linecache holds the source under a made-up file name so that inspect.getsource (triton.jit) and
# tracebacks see it.
PACK_RUN = b'.decode();F=__file__+"*";C.cache[F]=0,None,s.splitlines(1),F;exec(compile(s,F,"exec"))\n'
PACK_TAILS = (b'""".encode("l1"),format=L.FORMAT_RAW,filters=[{"id":L.FILTER_LZMA2}])' + PACK_RUN, b'""".encode("l1"))' + PACK_RUN)


def latin1_literal(raw: bytes) -> bytes:
    """The body of a triple-quoted str literal in a latin-1 file that .encode("l1")s back to raw:
    the tokenizer refuses NUL and folds CR into LF, a backslash escapes, and a quote ends the
    literal only as the first of three (or just before the closing ones)."""
    esc = {b"\0": b"\\0", b"\r": b"\\r", b"\\": b"\\\\", b'"': b'\\"'}
    return re.sub(rb'(\0)(?=[0-7])|[\0\r\\]|"(?="|\Z)', lambda m: b"\\x00" if m[1] else esc[m[0]], raw)


def strip_source(src: bytes) -> bytes:
    """The shipped source: docstrings, comments, blank lines, the annotations of functions whose
    decorators do not read them and of a def's `x: T = v` locals removed, and blocks indented by one
    space per level. Everything is located with ast and tokenize, so string literals and all other
    code stay byte-identical (a body left empty gets `pass`)."""
    text = src.decode()
    lines = text.splitlines(keepends=True)
    char = lambda r, c: len(lines[r - 1].encode()[:c].decode())  # ast columns are utf-8 offsets  # noqa: E731
    cuts: dict[int, list] = {}
    gone = set()  # docstring lines after the first
    tree = ast.parse(text)
    local = {id(x) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for st in f.body for x in ast.walk(st) if isinstance(x, ast.AnnAssign)}
    local -= {id(x) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for x in c.body}

    def reads_annotations(fn):  # torch.library.custom_op (the op schema) and triton.jit (constexpr)
        return any(isinstance(x, ast.Attribute) and x.attr in ("custom_op", "jit") for d in fn.decorator_list for x in ast.walk(d))

    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and node.value and node.target.end_lineno == node.value.lineno and id(node) in local:
            r = node.lineno  # `x: T = v` in a def -> `x = v` (annotations of locals are never evaluated)
            cuts.setdefault(r, []).append((char(r, node.target.end_col_offset), lines[r - 1].rfind("=", 0, char(r, node.value.col_offset))))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not reads_annotations(node):
            a = node.args
            for arg in a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]:
                if arg.annotation and arg.annotation.end_lineno == arg.lineno:
                    cuts.setdefault(arg.lineno, []).append((char(arg.lineno, arg.col_offset) + len(arg.arg),
                                                            char(arg.lineno, arg.annotation.end_col_offset)))
            if node.returns and node.returns.lineno == node.returns.end_lineno:
                r = node.returns.lineno
                c0 = lines[r - 1].rfind("->", 0, char(r, node.returns.col_offset))
                cuts.setdefault(r, []).append((len(lines[r - 1][:c0].rstrip()), char(r, node.returns.end_col_offset)))
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            d = body[0]
            if lines[d.lineno - 1][: d.col_offset].strip() or lines[d.end_lineno - 1].encode()[d.end_col_offset :].strip():
                continue  # shares its line with code: leave it
            cuts.setdefault(d.lineno, []).append((d.col_offset, None if len(body) > 1 else "pass"))
            gone.update(range(d.lineno + 1, d.end_lineno + 1))
    keep, starts, depth, at_start = set(), {}, 0, True
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            cuts.setdefault(tok.start[0], []).append((tok.start[1], None))
        elif tok.type in (tokenize.INDENT, tokenize.DEDENT):
            depth += 1 if tok.type == tokenize.INDENT else -1
        elif tok.type == tokenize.NEWLINE:
            at_start = True
        elif tok.type != tokenize.NL and at_start:
            starts[tok.start[0]], at_start = depth, False
        if tok.end[0] > tok.start[0]:
            keep.update(range(tok.start[0] + 1, tok.end[0] + 1))  # inside a multi-line string: as is
    out = []
    for r, line in enumerate(lines, 1):
        for c0, c1 in sorted(cuts.get(r, []), reverse=True):
            line = line[:c0] + ("\n" if c1 is None else c1 + "\n" if isinstance(c1, str) else line[c1:])
        if r in gone:
            continue
        if r in keep:
            out.append(line)
        elif line.strip():
            out.append(" " * starts.get(r, 1) + line.strip() + "\n")
    return "".join(out).encode()


# Top-level definitions of train_gpt.py that only the named knobs reach: the shipped file leaves a
# group out when every one of its knobs has the value given here. Never shipped: the way the readable
# file counts itself (the wrapper counts its own length) and check_config (the shipped config was
# checked when it was packed).
PRUNE = (
    ({}, "readable_code_bytes check_config VALUE_RANGES"),
    ({"lora_ttt_enabled": False}, "phase_bounds DocLoRA spans global_sgd eval_lora_ttt"),
    ({"lora_ttt_enabled": False, "doc_eval_enabled": False},
     "doc_spans doc_chunks doc_windows window_batch score_doc_windows accumulate eval_doc_windows"),
    ({"compressor": "brotli"}, "CODECS codec_fns smallest_stream l1_chain tensor_role encode_pergroup _unstream decode_pergroup"),
    ({"lqer_top_n": 0}, "lqer_factors quantize_asym dequantize_asym"),
    ({"awq_lite": False}, "awq_group awq_scales"),
    ({"embed_bits_tiers": ""}, "parse_tiers embed_row_tiers"),
    ({"embed_rotation_rank": 0}, "LowRankResidual"),
    ({"ttt_hash_embed": False}, "bigram_hash"),
    ({"embed_sparsity": 0.0}, "sparsify_rows_"),
)
def rename_globals(src: bytes) -> bytes:
    """src with the module's functions and constants renamed to free two-letter names, most used first
    (a function's __name__ changes with it: none is printed). Left alone: classes (their names
    print), imports, dunders, PRESETS (tools read it from a shipped file), names in f-strings, and any
    name also bound in a def, lambda, class or comprehension (a parameter, local, import or
    except-as), where one name has two meanings."""
    tree = ast.parse(src)
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    mine = set(defs) | {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    seen = set(dir(builtins)) | set(keyword.kwlist) | set(keyword.softkwlist)
    other = {"PRESETS"}  # bound some other way, or kept
    todo = [(n, True) for n in tree.body]
    while todo:
        node, top = todo.pop()
        if isinstance(node, ast.Name):
            seen.add(node.id)
            if not (top or isinstance(node.ctx, ast.Load)):
                other.add(node.id)
        elif isinstance(node, ast.arg):
            other.add(node.arg)
        elif isinstance(node, ast.alias):
            other.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and defs.get(node.name) is not node:
            other.add(node.name)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            other.add(node.name)
        elif isinstance(node, ast.JoinedStr):
            other.update(x.id for x in ast.walk(node) if isinstance(x, ast.Name))
        scope = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.ListComp, ast.SetComp,
                                  ast.DictComp, ast.GeneratorExp))
        todo += [(x, top and not scope) for x in ast.iter_child_nodes(node)]
    seen |= other | set(defs)  # a def no Name refers to still holds its name
    names = [x for x in ast.walk(tree) if isinstance(x, ast.Name) and x.id in mine - other and len(x.id) > 2 and x.id[:2] != "__"]
    ids = [x.id for x in names]
    new = dict(zip(_most_used(ids + [n for n in defs if n in ids]), (s for s in _short_names(2) if s not in seen)))
    lines = src.splitlines(keepends=True)
    edits = [(x.lineno, x.col_offset, x.end_col_offset, new[x.id]) for x in names]
    for name in set(new) & set(defs):
        r = defs[name].lineno
        c = re.search(rb"def\s+(" + name.encode() + rb")\b", lines[r - 1]).start(1)
        edits.append((r, c, c + len(name), new[name]))
    return _apply_renames(src, edits)


def rename_locals(src: bytes) -> bytes:
    """src with each function's own local variables renamed to the shortest free names, most used first.
    Left alone: parameters (callers pass them by keyword), imports, except-as and global/nonlocal
    names, names in f-strings (f"{x=}" prints the name), module names and builtins, and functions with
    a class, match or locals()/vars()/eval/exec inside. Outer defaults and decorators run outside."""
    tree = ast.parse(src)
    outer = set(dir(builtins)) | set(keyword.kwlist) | set(keyword.softkwlist)
    todo = list(tree.body)
    while todo:  # the module's own names: not inside a def, lambda or class body
        node = todo.pop()
        if isinstance(node, ast.Name):
            outer.add(node.id)
        elif isinstance(node, ast.alias):
            outer.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            outer.add(node.name)
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Lambda)):
            todo += ast.iter_child_nodes(node)
    tops = [n for p in [tree, *[c for c in tree.body if isinstance(c, ast.ClassDef)]] for n in p.body
            if isinstance(n, ast.FunctionDef)]
    edits = []
    for fn in tops:
        nodes = [x for stmt in fn.body for x in ast.walk(stmt)]
        names = [x for x in nodes if isinstance(x, ast.Name)]
        if any(isinstance(x, (ast.ClassDef, ast.Match)) for x in nodes) or \
                {x.id for x in names} & {"locals", "vars", "eval", "exec"}:
            continue
        keep = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)} | outer
        for x in nodes:
            if isinstance(x, ast.arg):
                keep.add(x.arg)
            elif isinstance(x, (ast.Global, ast.Nonlocal)):
                keep.update(x.names)
            elif isinstance(x, ast.alias):
                keep.add((x.asname or x.name).split(".")[0])
            elif isinstance(x, ast.ExceptHandler) and x.name:
                keep.add(x.name)
            elif isinstance(x, ast.JoinedStr):
                keep.update(y.id for y in ast.walk(x) if isinstance(y, ast.Name))
        local = {x.id for x in names if not isinstance(x.ctx, ast.Load)} - keep
        used = keep | {x.id for x in names}
        fresh = (s for n in range(1, 3) for s in _short_names(n) if s not in used)
        new = dict(zip(_most_used([x.id for x in names if x.id in local]), fresh))
        edits += [(x.lineno, x.col_offset, x.end_col_offset, new[x.id]) for x in names if x.id in new and new[x.id] != x.id]
    return _apply_renames(src, edits)


def _most_used(ids: list[str]) -> list[str]:
    """The distinct ids, most frequent first (ties by name: the same order under every Python)."""
    count = collections.Counter(ids)
    return sorted(count, key=lambda k: (-count[k], k))


def _apply_renames(src: bytes, edits: list[tuple[int, int, int, str]]) -> bytes:
    """src with each (line, start col, end col, name) span replaced; spans never overlap."""
    lines = src.splitlines(keepends=True)
    for r, c0, c1, name in sorted(edits, reverse=True):
        lines[r - 1] = lines[r - 1][:c0] + name.encode() + lines[r - 1][c1:]
    return b"".join(lines)


def _short_names(n: int):
    first = string.ascii_letters + "_"
    for head in first:
        if n == 1:
            yield head
        else:
            for tail in itertools.product(first + string.digits, repeat=n - 1):
                yield head + "".join(tail)


def squeeze_source(src: bytes) -> bytes:
    """Each logical line rebuilt from its tokens, a space only between two that would merge, one space
    of indent per level, simple statements in a row joined by `;` and a body of them moved onto its
    header's line (the syntax tree stays the same); strings (f-strings whole) as written."""
    lines = src.decode().splitlines(keepends=True)

    def text(a, b):  # source between two (row, col) positions
        if a[0] == b[0]:
            return lines[a[0] - 1][a[1] : b[1]]
        return lines[a[0] - 1][a[1] :] + "".join(lines[a[0] : b[0] - 1]) + lines[b[0] - 1][: b[1]]

    out, cur, depth, prev, fstr = [], [], 0, None, None
    word = lambda c: c.isalnum() or c == "_"  # noqa: E731
    for tok in tokenize.generate_tokens(io.StringIO(src.decode()).readline):
        kind = tokenize.tok_name[tok.type]
        if fstr is not None:  # 3.12+: an f-string comes as pieces; keep it as written
            fstr[1] += kind == "FSTRING_START"
            fstr[1] -= kind == "FSTRING_END"
            if fstr[1]:
                continue
            tok, kind, fstr = tok._replace(string=text(fstr[0], tok.end)), "STRING", None
        if kind == "FSTRING_START":
            fstr = [tok.start, 1]
            continue
        if kind in ("INDENT", "DEDENT"):
            depth += 1 if kind == "INDENT" else -1
        elif kind == "NEWLINE":
            out.append((depth, "".join(cur)))
            cur, prev = [], None
        elif kind not in ("NL", "COMMENT", "ENDMARKER", "ENCODING"):
            s = tok.string
            if prev and (word(prev[1][-1]) or prev[0] == "NUMBER") and (word(s[0]) or s[0] == "." and prev[0] == "NUMBER"):
                cur.append(" ")
            cur.append(s)
            prev = (kind, s)
    res, i = [], 0
    def simple(s):  # a compound statement written on one line (`if a:b`) takes nothing before or after it
        return not s.endswith(":") and s[0] != "@" and not s.startswith("from __future__") and \
            re.match(r"(async|class|def|elif|else|except|finally|for|if|try|while|with)\b", s) is None

    while i < len(out):  # a header whose body is all simple statements takes them on its line
        d, s = out[i]
        body = list(itertools.takewhile(lambda x: x[0] > d, out[i + 1 :]))
        if s.endswith(":") and body and all(simple(x[1]) for x in body):
            res.append([d, s + ";".join(x[1] for x in body), False])
            i += 1 + len(body)
            continue
        if res and simple(s) and res[-1][2] and res[-1][0] == d:  # and simple statements share a line
            res[-1][1] += ";" + s
        else:
            res.append([d, s, simple(s)])
        i += 1
    return "".join(" " * d + s + "\n" for d, s, _ in res).encode()


def dead_ifs(tree, h) -> list:
    """The `if` statements without else that config h never enters: in a def whose parameter
    `h: Hyperparameters` is never rebound, a test that is false for h's pinned knobs whatever the
    other names hold (names, attributes, constants, not/and/or, one comparison: nothing to call),
    never all of a block's statements."""
    knobs = {f.name for f in fields(h)} - set(_module(h).FREE_KNOBS)
    ops = {ast.Eq: op.eq, ast.NotEq: op.ne, ast.Lt: op.lt, ast.LtE: op.le, ast.Gt: op.gt, ast.GtE: op.ge}
    pure = (ast.Name, ast.Attribute, ast.Constant, ast.Compare, ast.BoolOp, ast.UnaryOp, ast.expr_context, ast.boolop,
            ast.cmpop, ast.Not)

    def value(e):  # the test's value under h, or LookupError where it depends on anything else
        if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "h" and e.attr in knobs:
            return getattr(h, e.attr)
        if isinstance(e, ast.Constant):
            return e.value
        if isinstance(e, ast.UnaryOp) and isinstance(e.op, ast.Not):
            return not value(e.operand)
        if isinstance(e, ast.Compare) and len(e.ops) == 1 and type(e.ops[0]) in ops:
            return ops[type(e.ops[0])](value(e.left), value(e.comparators[0]))
        if isinstance(e, ast.BoolOp):
            known = []
            for x in e.values:
                try:
                    known.append(bool(value(x)))
                except LookupError:
                    pass
            if isinstance(e.op, ast.And) and False in known or isinstance(e.op, ast.Or) and True in known:
                return isinstance(e.op, ast.Or)
            if len(known) == len(e.values):
                return isinstance(e.op, ast.And)
        raise LookupError

    def dead(s):
        if not (isinstance(s, ast.If) and not s.orelse and all(isinstance(x, pure) for x in ast.walk(s.test))):
            return False
        try:
            return not value(s.test)
        except LookupError:
            return False

    out = []
    for fn in ast.walk(tree):
        a = fn.args.posonlyargs + fn.args.args if isinstance(fn, ast.FunctionDef) else []
        if not any(x.arg == "h" and isinstance(x.annotation, ast.Name) and x.annotation.id == "Hyperparameters" for x in a) or \
                any(isinstance(x, ast.Name) and x.id == "h" and not isinstance(x.ctx, ast.Load) for x in ast.walk(fn)):
            continue
        todo = [fn]
        while todo:  # this def's own statements: nested defs and lambdas see h through their own test
            node = todo.pop()
            for block in (getattr(node, k, None) for k in ("body", "orelse", "finalbody", "handlers")):
                if isinstance(block, list):
                    gone = [s for s in block if dead(s)]
                    out += gone if len(gone) < len(block) else []
                    todo += [s for s in block if s not in gone and not isinstance(s, (ast.FunctionDef, ast.ClassDef))]
    return out


def prune_source(src: bytes, h) -> bytes:
    """src for config h: without the PRUNE groups h cannot reach and the dead_ifs, PINNED set to h's
    values that are not the defaults (FREE_KNOBS aside)."""
    text = src.decode()
    lines = text.splitlines(keepends=True)
    free = _module(h).FREE_KNOBS
    pins = {f.name: getattr(h, f.name) for f in fields(h) if f.name not in free and getattr(h, f.name) != f.default}
    drop = {n for knobs, names in PRUNE if all(getattr(h, k) == v for k, v in knobs.items()) for n in names.split()}
    tree = ast.parse(text)
    new = {i: "" for s in dead_ifs(tree, h) for i in range(s.lineno - 1, s.end_lineno)}
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        first = min([node.lineno] + [x.lineno for x in getattr(node, "decorator_list", [])]) - 1
        if names == ["PINNED"] or set(names) & drop:
            new.update(dict.fromkeys(range(first, node.end_lineno), ""))
            if names == ["PINNED"]:
                new[first] = f"PINNED = {pins!r}\n"
    return "".join(new.get(i, line) for i, line in enumerate(lines)).encode()


def shipped_source(src: bytes, h=None) -> bytes:
    """What the wrapper for config h (default: train_gpt's defaults) runs: pruned, stripped, names renamed, squeezed."""
    return squeeze_source(rename_locals(rename_globals(strip_source(prune_source(src, h or _default_config())))))


def pack_source(src: bytes, h=None) -> bytes:
    """The counted form of the code for config h (default: train_gpt's defaults): shipped_source in the
    smaller self-extracting wrapper."""
    import brotli

    h = h or _default_config()
    _module(h).check_config(h)  # the shipped file trusts its config
    src = shipped_source(src, h)
    raw = (lzma.compress(src, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]),
           brotli.compress(src, quality=11))
    return min((head + latin1_literal(r) + t for head, r, t in zip(PACK_HEADS, raw, PACK_TAILS)), key=len)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(REPO / "train_gpt.py"))
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import train_gpt

    try:
        if not Path(a.src).is_file():
            raise train_gpt.ConfigError(f"--src {a.src} is not a file; give the readable train_gpt.py")
        src = Path(a.src).read_bytes()
        if src.startswith(PACK_HEADS):
            raise train_gpt.ConfigError(f"--src {a.src} is already packed; give the readable train_gpt.py it came from")
        if Path(a.out).is_dir():
            raise train_gpt.ConfigError(f"--out {a.out} is a folder; give a file path, e.g. {Path(a.out) / 'train_gpt.py'}")
        h = train_gpt.Hyperparameters.from_env()
        try:
            packed = pack_source(src, h)
        except (SyntaxError, ValueError, IndexError, KeyError, AttributeError) as e:
            raise train_gpt.ConfigError(f"--src {a.src} is not a train_gpt.py that can be packed ({type(e).__name__}: "
                                        f"{' '.join(str(e).split())[:120]}); give the readable train_gpt.py") from None
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_bytes(packed)
    except train_gpt.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write --out {a.out} ({e.strerror}); choose a writable file path", file=sys.stderr)
        return 2
    print(f"source_bytes:{len(src)} packed_bytes:{len(packed)} out:{a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
