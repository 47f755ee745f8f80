"""What does train_gpt.py count as its code? `python3 tools/pack_code.py --out DIR/train_gpt.py` writes its packed form.

    [PRESET=... KNOB=...] python3 tools/pack_code.py [--src train_gpt.py] --out records/.../train_gpt.py

The config is read as the run reads it (PRESET, then env vars), so set the same env as the run.
The wrapper (raw LZMA2 or brotli in a latin-1 string literal) runs shipped_source with exec: the
definitions and if-blocks that config cannot reach left out (PRUNE, dead_ifs), docstrings, comments
and unread annotations removed (strip_source), functions, constants and locals renamed and whitespace
squeezed by python-minifier (minify; pinned in requirements.txt). It runs
that config only: every knob but train_gpt.FREE_KNOBS is pinned to its packed value. Its size is what
the run logs as counted_code_bytes (code_packed:1): the readable train_gpt.py loads this file to count
itself. The readable file stays the source of truth. docs/evaluation.md describes each pass and
docs/benchmarks.md measures them against python-minifier's.
"""
from __future__ import annotations

import argparse
import ast
import builtins
import io
import lzma
import operator as op
import re
import sys
import tokenize
import types
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
    ({}, "readable_code_bytes check_config check_seq_schedule VALUE_RANGES"),
    ({"ttt_enabled": False}, "prepare_ttt ttt_chunk_bounds eval_ttt"),
    ({"lora_ttt_enabled": False}, "phase_bounds short_chunks lora_chunk_ends lora_windows lora_queues lora_rows lane_bucket "
     "pack_lanes LoraStep lora_substeps lora_step grouped_mm DocLoRA adamw_rows PackedLoRA lora_nll spans global_sgd "
     "eval_lora_ttt lora_substep lora_forward lora_warmup"),
    ({"lora_ttt_enabled": False, "doc_eval_enabled": False},
     "doc_spans doc_chunks doc_windows window_batch score_doc_windows accumulate eval_doc_windows"),
    ({"compressor": "brotli"}, "CODECS codec_fns smallest_stream l1_chain tensor_role encode_pergroup _unstream decode_pergroup"),
    ({"lqer_top_n": 0}, "lqer_factors quantize_asym dequantize_asym"),
    ({"awq_lite": False}, "awq_groups awq_scales"),
    ({"embed_bits_tiers": ""}, "parse_tiers embed_row_tiers"),
    ({"embed_rotation_rank": 0}, "LowRankResidual"),
    ({"ttt_hash_embed": False}, "bigram_hash"),
    ({"embed_sparsity": 0.0}, "sparsify_rows_"),
    ({"asym_softcap": False}, "asym_cap"),
    ({"ngram_tilt": False}, "NGRAM_MULTS ngram_hints hinted_nll tilted_nll tilt_nll tilt_plan"),
)
# python-minifier's options for the shipped source (docs/benchmarks.md has the bytes of each): its
# renaming and printing beat ours (the removed rename_globals, rename_locals and squeeze_source), and
# constant_folding saves bytes. Left off: the passes that change what the program does (remove_asserts;
# remove_annotations: torch.library.custom_op and triton.jit read them) and those that grow the packed
# file here (hoist_literals, combine_imports, remove_pass, remove_explicit_return_none) or save nothing.
# Docstrings are gone before it runs (strip_source); its literal-statement pass finds none. The version
# is pinned (requirements.txt): the counted bytes are its output.
MINIFIER_VERSION = "3.4.0"
MINIFY = dict(rename_locals=True, rename_globals=True, constant_folding=True, remove_literal_statements=True,
              remove_pass=False, remove_annotations=False, hoist_literals=False, combine_imports=False,
              remove_object_base=False, convert_posargs_to_args=False, remove_asserts=False, remove_debug=False,
              remove_explicit_return_none=False, remove_builtin_exception_brackets=False, remove_dead_branches=False,
              preserve_shebang=False)


def minify(src: bytes) -> bytes:
    """src renamed and printed by python-minifier: each function's locals and the module's functions,
    constants and imports get short names (parameters, classes and PRESETS keep theirs: callers pass
    keywords, class names print, tools read PRESETS from a shipped file), statements are joined and
    whitespace squeezed. ImportError names the package when it is missing or another version."""
    import importlib.metadata

    import python_minifier
    import python_minifier.expression_printer

    version = importlib.metadata.version("python-minifier")
    if version != MINIFIER_VERSION:
        raise ImportError(f"python-minifier {version} is installed; the counted code is "
                          f"python-minifier {MINIFIER_VERSION}'s output: pip install python-minifier=={MINIFIER_VERSION}",
                          name="python_minifier")
    tree = ast.parse(src)
    keep = ["PRESETS"] + [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    # Its global renaming also binds builtins to short global names (E=len); a triton.jit kernel may
    # read no global but a constexpr, so the builtins a kernel calls (range, float) keep their names.
    kernels = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and
               any(isinstance(x, ast.Attribute) and x.attr == "jit" for d in f.decorator_list for x in ast.walk(d))]
    # Triton resolves a kernel's names by itself (globals first): a name the kernel reads from outside
    # (`tl`, imported in the function that builds it) keeps its name, local or global, so that no
    # renamed local of the builder takes a name a global already has (triton would read the global).
    outside = sorted({x.id for f in kernels for x in ast.walk(f) if isinstance(x, ast.Name) and isinstance(x.ctx, ast.Load)} -
                     {x.id for f in kernels for x in ast.walk(f) if isinstance(x, ast.Name) and not isinstance(x.ctx, ast.Load)} -
                     {x.arg for f in kernels for x in ast.walk(f.args) if isinstance(x, ast.arg)} - set(dir(builtins)))
    keep += outside
    # Nor may it bind a kernel's parameter to a short local (`H=BLOCK`): a tl.constexpr does not survive
    # the assignment, and tl.arange refuses the copy. The parameters keep their names (in every def).
    params = sorted({x.arg for f in kernels for x in ast.walk(f.args) if isinstance(x, ast.arg)})
    # Annotations are strings at run time (from __future__ import annotations) that the program reads
    # (Hyperparameters' field types parse the env): the builtins named in one keep their names too.
    notes = [x for n in ast.walk(tree) for x in (getattr(n, "annotation", None), getattr(n, "returns", None)) if x]
    keep += sorted({x.id for f in kernels + notes for x in ast.walk(f) if isinstance(x, ast.Name) and x.id in dir(builtins)})
    # It writes f-strings with PEP 701 nesting (f"{" ".join(x)}") when it runs on Python 3.12+, which
    # 3.10 and 3.11 cannot parse, and which would make the counted bytes depend on the Python that
    # packs. Its printer reads the version from its own module's sys; with 3.11 there, the output is
    # the same under 3.10-3.13 (tests/test_pack_code.py) and runs on all of them.
    printer = python_minifier.expression_printer
    real_sys, printer.sys = printer.sys, types.SimpleNamespace(version_info=(3, 11))
    try:
        return python_minifier.minify(src.decode(), preserve_globals=keep, preserve_locals=outside + params, **MINIFY).encode()
    finally:
        printer.sys = real_sys


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
    """What the wrapper for config h (default: train_gpt's defaults) runs: pruned, stripped, minified."""
    return minify(strip_source(prune_source(src, h or _default_config())))


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
