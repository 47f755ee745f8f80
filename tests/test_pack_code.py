"""tools/pack_code.py: the packed (counted) train_gpt.py runs the same program, for every config and Python."""
import ast
import builtins
import dataclasses
import dis
import glob
import hashlib
import inspect
import io
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tokenize
import types

import pytest

import train_gpt as tg
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import pack_code as pc  # noqa: E402
import records  # noqa: E402


def test_pack_source_behaves_identically(tmp_path):
    src = b"import inspect,sys\ndef f(x):\n    y = x + 1\n    return y\nprint('packed', __name__, len(sys.argv))\nprint(inspect.getsource(f))\n"
    packed = pc.pack_source(src)
    (tmp_path / "p.py").write_bytes(packed)
    out = subprocess.run([sys.executable, str(tmp_path / "p.py"), "a"], capture_output=True, text=True)
    # triton.jit reads its kernels' source with inspect: the wrapper must keep it reachable
    assert out.stdout == "packed __main__ 2\ndef C(x):A=x+1;return A\n\n", out.stderr
    h = tg.Hyperparameters(compressor="pergroup")
    assert tg.counted_code_bytes(h) == (len(pc.pack_source((REPO / "train_gpt.py").read_bytes(), h)), True)


def test_a_shipped_file_counts_its_own_size_and_a_lone_copy_estimates(tmp_path, monkeypatch):
    """The wrapper (PINNED set) counts its file; the readable file without tools/ beside it logs an estimate."""
    monkeypatch.setattr(tg, "PINNED", {})
    assert tg.counted_code_bytes(tg.Hyperparameters()) == ((REPO / "train_gpt.py").stat().st_size, True)
    lone = tmp_path / "train_gpt.py"
    shutil.copy(REPO / "train_gpt.py", lone)
    out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import train_gpt as t; "
                          "print(t.counted_code_bytes(t.Hyperparameters()))", str(tmp_path)], capture_output=True, text=True)
    est, packed = eval(out.stdout.splitlines()[-1])
    assert "code_size ESTIMATE" in out.stdout and packed is False, out.stderr[-500:]
    exact = len(pc.pack_source(lone.read_bytes(), tg.Hyperparameters()))
    assert exact < est < 3 * exact  # the same order: a lone copy's headroom is roughly right


def test_a_run_without_the_pinned_minifier_logs_an_estimate(monkeypatch):
    """The readable file counts an estimate, labelled, when tools/pack_code.py cannot run: the run goes on."""
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9.9")
    lines = []
    est, packed = tg.counted_code_bytes(tg.Hyperparameters(), lines.append)
    assert packed is False and est > 10_000 and len(lines) == 1
    assert lines[0].startswith("code_size ESTIMATE: tools/pack_code.py cannot run (python-minifier 9.9.9 is installed")


@pytest.mark.parametrize("seed, tail", [(0, b'"\\'), (1, b'"'), (2, b'""'), (3, b"\x00"), (4, b"\x007")])
def test_latin1_literal_carries_every_byte(tmp_path, seed, tail):
    """The wrapper's literal, read back by Python's own parser, is the compressed stream byte for byte."""
    raw = bytes(range(256)) + b'"""\\\r\n\0' + b'\x000\x007\x008""""x\\"\x00' + random.Random(seed).randbytes(4000) + tail
    (tmp_path / "l.py").write_bytes(b'#coding:l1\nimport sys;sys.stdout.buffer.write("""' + pc.latin1_literal(raw) + b'""".encode("l1"))\n')
    out = subprocess.run([sys.executable, str(tmp_path / "l.py")], capture_output=True)
    assert out.returncode == 0 and out.stdout == raw, out.stderr[-300:]
    assert len(pc.latin1_literal(raw)) < 1.02 * len(raw)


def test_unpack_reads_a_literal_that_ends_in_a_quote():
    """tools/records.py reads the source back out of a wrapper whose stream ends in a quote (escaped,
    just before the closing quotes)."""
    import brotli

    src = next(s for i in range(20000) if brotli.compress(s := hashlib.sha256(b"%d" % i).digest() * 2, quality=11).endswith(b'"'))
    body = pc.latin1_literal(brotli.compress(src, quality=11))
    assert body.endswith(b'\\"')
    assert records.unpack_wrapper(pc.PACK_HEADS[1] + body + pc.PACK_TAILS[1]) == src


GLOBAL_OPS = {"LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL", "LOAD_NAME", "STORE_NAME", "DELETE_NAME"}


def same_program_up_to_local_names(a: types.CodeType, b: types.CodeType, names: dict, glob: dict | None = None):
    """Asserts that two code objects run the same instructions on the same attributes and constants,
    and differ at most by a one-to-one renaming of local variables (fresh per function) and, given
    glob, one module-wide one-to-one renaming of global names (else globals must match)."""
    assert a.co_argcount == b.co_argcount and a.co_kwonlyargcount == b.co_kwonlyargcount and a.co_flags == b.co_flags, a.co_name
    n = a.co_argcount + a.co_kwonlyargcount + bool(a.co_flags & 4) + bool(a.co_flags & 8)
    for i, (p, q) in enumerate(zip(a.co_varnames[:n], b.co_varnames[:n])):  # self, cls, *args, **kwargs: no caller names them
        free = p in ("self", "cls") or i >= a.co_argcount + a.co_kwonlyargcount
        assert (p == q or free) and names.setdefault(p, q) == q, f"{a.co_name}: parameter {p} renamed"
    # a `pass` compiles to a NOP, and the minifier drops a pass it does not need; EXTENDED_ARG depends
    # on how many names and constants a code object holds
    ia, ib = [[i for i in dis.get_instructions(c) if i.opname not in ("NOP", "EXTENDED_ARG")] for c in (a, b)]
    assert [i.opname for i in ia] == [i.opname for i in ib], a.co_name
    for j, (x, y) in enumerate(zip(ia, ib)):
        if isinstance(x.argval, types.CodeType):  # a def in a module or class body renames on its own
            inner = dict(names) if a.co_flags & inspect.CO_OPTIMIZED else {}
            same_program_up_to_local_names(x.argval, y.argval, inner, glob)
            for v in x.argval.co_freevars if a.co_flags & inspect.CO_OPTIMIZED else ():  # a closure's: the same both ways
                assert names.setdefault(v, inner[v]) == inner[v], f"{a.co_name}: {v} renamed two ways"
        elif x.opname in ("MAKE_CELL", "LOAD_CLOSURE"):  # cells are made and passed in the sorted order of their names
            continue
        elif x.opcode in dis.haslocal or x.opcode in dis.hasfree:
            assert names.setdefault(x.argval, y.argval) == y.argval, f"{a.co_name}: {x.argval} renamed two ways"
        elif glob is not None and x.opname in GLOBAL_OPS:
            assert glob.setdefault(x.argval, y.argval) == y.argval, f"{a.co_name}: global {x.argval} renamed two ways"
        elif glob is not None and ia[j + 1 :][:1] and ia[j + 1].opname == "MAKE_FUNCTION" and isinstance(x.argval, str):  # 3.10: qualname
            head, *rest = x.argval.split(".")
            assert ".".join([glob.get(head, head), *rest]) == y.argval, f"{a.co_name}: {x.argval} != {y.argval}"
        else:
            assert x.argval == y.argval, f"{a.co_name}: {x.opname} {x.argval!r} != {y.argval!r}"
    assert len(set(names.values())) == len(names), f"{a.co_name}: two locals renamed to one name"
    assert glob is None or len(set(glob.values())) == len(glob), f"{a.co_name}: two globals renamed to one name"


def unaliased(src: bytes) -> bytes:
    """src less the module-level `E=len` lines by which the minifier gives builtins short names, so
    that the bytecode comparison sees `E` as a renaming of `len`."""
    tree = ast.parse(src)
    tree.body = [n for n in tree.body if not (isinstance(n, ast.Assign) and isinstance(n.value, ast.Name) and
                                              n.value.id in dir(builtins)
                                              and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name))]
    return ast.unparse(tree).encode()


RENAME_CASES = b'''
import functools
total = 100
def deco(f):
    return f
def outer(a, b=2, *args, k=3, **kw):
    counter = 0
    values = [counter + v for v in range(a)]
    def inner(step=b):
        nonlocal counter
        counter += step
        return counter
    def make():
        acc = []
        for i in range(3):
            acc.append(i * total)
        return acc
    try:
        raise ValueError(a)
    except ValueError as err:
        msg = str(err)
    if (width := len(values)) > 1:
        width += 1
    label = f"{width=} {msg!r:>6}"
    lam = lambda z, q=k: z + q + a
    squares = {x: x * x for x in values}
    return inner(), inner(5), make(), label, lam(1), sorted(squares.items()), width, args, kw
def boxed(n):
    kept_name = n + 1
    class Box:
        item = kept_name
    return Box.item
def bump(n):
    global total
    total_before = total
    total += n
    return total_before, total
@deco
def third(longname_one, longname_two):
    longname_three = longname_one + longname_two
    longname_four = [longname_three for _ in range(2)]
    return longname_four, eval("1 + 1")
@functools.lru_cache
def fourth(x):
    product = x * 2
    return product
print(outer(4, 1, 9, k=2, extra=1), boxed(1), bump(2), bump(3))
print(third(longname_two=1, longname_one=2), fourth(x=3))
'''


GLOBAL_CASES = b'''
import functools
LIMIT = 3
SCALE = 2.0
def helper(x):
    return x * SCALE
def shadowed(v):
    return v + 1
def uses_param(shadowed):
    return shadowed * 2
def counted():
    global LIMIT
    LIMIT += 1
    return LIMIT
def wrap(f):
    @functools.wraps(f)
    def inner(*a):
        return f(*a) + 1
    return inner
@wrap
def decorated(x):
    return helper(x)
class Box:
    size = LIMIT
    def get(self):
        return helper(self.size)
TABLE = {k: helper(k) for k in range(LIMIT)}
def shown():
    return f"{SHOWN_VALUE=}"
SHOWN_VALUE = 5
def caught():
    try:
        raise ValueError("boom")
    except ValueError as problem:
        return str(problem)
def problem():
    return "module-level"
def loader():
    import json as codec
    return codec.dumps([1])
def codec():
    return "mine"
def aa():
    return "registered elsewhere, never named"
print(helper(2), uses_param(3), shadowed(1), counted(), decorated(4), Box().get(), TABLE, shown())
print(caught(), problem(), loader(), codec())
'''


def test_minify_keeps_behaviour_and_every_name_callers_see(tmp_path):
    """python-minifier's renaming: the same output and the same bytecode up to local and global names;
    parameters (callers pass keywords; but self, cls, *args, **kwargs), classes (their names print) and
    PRESETS keep their names."""
    for i, case in enumerate((RENAME_CASES, GLOBAL_CASES + b"PRESETS = {'a': LIMIT}\nprint(PRESETS)\n")):
        out, glob = pc.minify(case), {}
        runs = []
        for name, code in ((f"a{i}.py", case), (f"b{i}.py", out)):
            (tmp_path / name).write_bytes(code)
            runs.append(subprocess.run([sys.executable, str(tmp_path / name)], capture_output=True, text=True))
        assert runs[0].returncode == 0 and runs[0].stdout == runs[1].stdout, runs[1].stderr
        same_program_up_to_local_names(compile(case, "a", "exec"), compile(unaliased(out), "b", "exec"), {}, glob)
        assert len(out) < 0.8 * len(case)
    assert b"class Box" in out and b"PRESETS=" in out and b"def uses_param(shadowed)" not in out
    assert b"longname_one" in pc.minify(RENAME_CASES)  # a parameter, passed by keyword
    assert {k for k, v in glob.items() if k != v} >= {"helper", "counted", "SCALE"}


def test_minify_refuses_another_python_minifier_version(monkeypatch):
    """The counted bytes are python-minifier 3.4.0's output: another version would count other bytes."""
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9.9")
    with pytest.raises(ImportError, match="python-minifier 9.9.9 is installed.*pip install python-minifier==3.4.0"):
        pc.minify(b"x = 1\n")


def test_shipped_source_keeps_what_the_program_reads_by_name():
    """The minified train_gpt.py, for the default config and one that keeps every group, keeps what is
    read by name at run time: class names (they print), PRESETS (tools read it), the annotation
    strings of Hyperparameters' fields (their types parse the env), the signature of every def (callers pass
    keywords; custom_op reads names and types) and the builtins the triton kernels call (a kernel may
    read no other global). Its bytecode differs by more than names (the minifier binds a parameter used
    often to a short local, `A=self`), so that the behaviour is the same is the end-to-end test's
    (tests/test_quant.py: the packed file logs the same lines and writes the same artifact)."""
    src = (REPO / "train_gpt.py").read_bytes()
    for h in (tg.Hyperparameters(), tg.Hyperparameters(lora_ttt_enabled=True, compressor="pergroup", lqer_top_n=3, awq_lite=True,
                                                        embed_bits_tiers="4:8,8", embed_rotation_rank=4, ttt_hash_embed=True, embed_sparsity=0.1)):
        stripped = pc.strip_source(pc.prune_source(src, h))
        minified = pc.minify(stripped)
        a, b = ast.parse(stripped), ast.parse(minified)
        classes = lambda t: [n.name for n in ast.walk(t) if isinstance(n, ast.ClassDef)]  # noqa: E731
        assert classes(a) == classes(b) and b"\nPRESETS=" in minified
        hp = lambda t: [ast.unparse(x.annotation) for c in t.body if getattr(c, "name", "") == "Hyperparameters"  # noqa: E731
                        for x in c.body if isinstance(x, ast.AnnAssign)]
        assert hp(a) == hp(b) and {"int", "float", "bool", "str"} <= set(hp(b))
        defs = lambda t: [f.args.args + f.args.kwonlyargs for f in ast.walk(t) if isinstance(f, ast.FunctionDef)]  # noqa: E731
        for x, y in zip(defs(a), defs(b), strict=True):  # self and cls aside: no caller names them
            assert [p.arg for p in x if p.arg not in ("self", "cls")] == [q.arg for p, q in zip(x, y) if p.arg not in ("self", "cls")]
        kernels = lambda t: [{x.id for x in ast.walk(f) if isinstance(x, ast.Name) and x.id in dir(builtins)}  # noqa: E731
                             for f in ast.walk(t) if isinstance(f, ast.FunctionDef) and f.decorator_list
                             and ast.unparse(f.decorator_list[0]).endswith(".jit")]
        assert len(kernels(a)) == 2 and kernels(a) == kernels(b) and {"range", "float"} <= kernels(b)[0], kernels(b)
        assert len(minified) < 0.9 * len(stripped)


PACK_ONLY = """
import dataclasses, hashlib, json, sys
sys.path.insert(0, sys.argv[3])
import pack_code  # the standard library only: no torch needed
src = open(sys.argv[1], "rb").read()
knobs, FREE_KNOBS, check_config = *json.loads(sys.argv[2]), None  # [name, default, value], what pack_code reads here
H = dataclasses.make_dataclass("H", [(n, object, dataclasses.field(default=d)) for n, d, _ in knobs])
H.__module__ = "__main__"  # pack_code finds FREE_KNOBS in the config's module
h = H(**{n: v for n, _, v in knobs})
print(hashlib.sha256(pack_code.shipped_source(src, h)).hexdigest())
"""


def test_shipped_source_is_the_same_under_every_python_here():
    """The run counts its packed size on the GPU machine and tools/records.py re-packs elsewhere:
    the shipped source must not depend on the Python version (3.12 tokenizes f-strings in pieces)."""
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    found = {}
    for p in [shutil.which(f"python3.{m}") for m in range(10, 15)] + \
            sorted(glob.glob(os.path.expanduser(os.environ.get("PYENV_ROOT", "~/.pyenv")) + "/versions/3.1*/bin/python3")):
        v = p and subprocess.run([p, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True).stdout.split()
        has_minifier = v and subprocess.run([p, "-c", "import python_minifier"], capture_output=True).returncode == 0
        if v and tuple(map(int, v)) >= (3, 10) and ".".join(v) != here and has_minifier:
            found.setdefault(".".join(v), p)
    others = list(found.values())
    if not others:
        pytest.skip("no other python3.x with python-minifier on PATH to compare with")
    src = REPO / "train_gpt.py"
    for h in (tg.Hyperparameters(), tg.Hyperparameters(lora_ttt_enabled=True, compressor="pergroup", num_layers=5)):
        knobs = json.dumps([[(f.name, f.default, getattr(h, f.name)) for f in dataclasses.fields(h)], tg.FREE_KNOBS])
        want = hashlib.sha256(pc.shipped_source(src.read_bytes(), h)).hexdigest()
        for py in others:
            out = subprocess.run([py, "-c", PACK_ONLY, str(src), knobs, str(REPO / "tools")], capture_output=True, text=True, timeout=120)
            assert out.stdout.strip() == want, (py, out.stderr[-500:])


def node_names(node) -> list[str]:
    """The names a top-level statement defines: a def or class, or plain assignment targets."""
    import ast

    return [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
        [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]


def top_level_names(src: bytes) -> set[str]:
    import ast

    return {n for node in ast.parse(src).body for n in node_names(node)}


def test_pruning_leaves_out_exactly_the_groups_the_config_cannot_reach():
    src = (REPO / "train_gpt.py").read_bytes()
    tops, defaults = top_level_names(src), tg.Hyperparameters()
    # every group off: the defaults but LQER, LoRA TTT and the n-gram tilt (on since #2135)
    base = tg.Hyperparameters(lqer_top_n=0, lora_ttt_enabled=False, ngram_tilt=False)
    groups = [(knobs, set(names.split())) for knobs, names in pc.PRUNE]
    for knobs, names in groups:
        assert names <= tops, names - tops  # a misspelt name would silently ship
        assert all(getattr(base, k) == v for k, v in knobs.items())  # the pins are the knobs' off values
    always = groups[0][1]
    on = dict(ttt_enabled=True, lora_ttt_enabled=True, doc_eval_enabled=True, compressor="pergroup", lqer_top_n=2,
              awq_lite=True, embed_bits_tiers="128:8,rest:6", embed_rotation_rank=4, ttt_hash_embed=True,
              embed_sparsity=0.5, asym_softcap=True, ngram_tilt=True)
    assert {k for knobs, _ in groups for k in knobs} == set(on)
    gone = lambda h: tops - top_level_names(pc.prune_source(src, h))  # noqa: E731
    assert gone(tg.Hyperparameters(**on)) == always
    assert gone(base) == set().union(*(names for _, names in groups))
    for k, v in on.items():  # one knob on keeps exactly the groups that name it
        assert gone(dataclasses.replace(base, **{k: v})) == set().union(*(n for kn, n in groups if k not in kn))
    assert gone(defaults) == gone(dataclasses.replace(base, lqer_top_n=3, lora_ttt_enabled=True, ngram_tilt=True))
    pins = lambda h: eval(next(l for l in pc.prune_source(src, h).decode().splitlines() if l.startswith("PINNED")).split("=", 1)[1])  # noqa: E731
    assert pins(defaults) == {} and pins(tg.Hyperparameters(**on)) == {k: v for k, v in on.items() if getattr(defaults, k) != v}
    free = dict(run_id="r", seed=7, data_dir="d", caseops=False, data_path="p", tokenizer_path="t", log_dir="l", artifact_path="a",
                eval_artifact="e", eval_nll_dir="n", compile=False, sdpa_fallback=True)
    assert set(free) == set(tg.FREE_KNOBS) and pins(tg.Hyperparameters(**free, num_layers=5)) == {"num_layers": 5}
    with pytest.raises(tg.ConfigError, match="NUM_HEADS"):  # a config is checked before it is packed
        pc.pack_source(src, tg.Hyperparameters(num_heads=7))


FOLD_CASES = """
def f(h: Hyperparameters, x):
    if h.lora_ttt_enabled:
        x += 1  # gone: off
    if x > 2 and h.ttt_enabled or h.lora_ttt_enabled:
        x += 2  # kept: x decides
    if x and h.lora_ttt_enabled:
        x += 3  # gone: pure names and off
    if check(x) and h.lora_ttt_enabled:
        x += 4  # kept: a call
    if h.ttt_enabled:
        x += 5  # kept: on
    if h.seed == 5:
        x += 6  # kept: a free knob
    if h.lora_ttt_enabled:
        x += 7  # kept: an else
    else:
        x -= 7
    if h.compressor == "pergroup" or h.lora_ttt_enabled:
        x += 8  # gone: both off
    for y in range(2):
        if h.lora_ttt_enabled:
            x += 9  # kept: the loop's only statement
    def inner(h):
        if h.lora_ttt_enabled:
            x += 10  # kept: another h
        return x
    return x
def g(h, x):
    if h.lora_ttt_enabled:
        x += 11  # kept: h not annotated
    return x
def k(h: Hyperparameters, x):
    h = other(h)
    if h.lora_ttt_enabled:
        x += 12  # kept: h rebound
    return x
"""


def test_dead_ifs_are_the_blocks_the_config_never_enters():
    import ast

    gone = pc.dead_ifs(ast.parse(FOLD_CASES), tg.Hyperparameters(lora_ttt_enabled=False, ttt_enabled=True))
    assert sorted(ast.unparse(s.body[0]) for s in gone) == ["x += 1", "x += 3", "x += 8"]
    assert pc.dead_ifs(ast.parse(FOLD_CASES), tg.Hyperparameters(lora_ttt_enabled=True, ttt_enabled=True)) == []
    src = (REPO / "train_gpt.py").read_bytes()
    on = tg.Hyperparameters(ttt_enabled=True, doc_eval_enabled=True, compressor="pergroup", lqer_top_n=3, awq_lite=True)
    for h in (tg.Hyperparameters(lora_ttt_enabled=False), tg.Hyperparameters.from_env({"PRESET": "smoke"}), on):
        gone = pc.dead_ifs(ast.parse(src), h)
        assert gone or h is on
        for s in gone:  # Python's own eval of each test: false whatever its other names hold
            names = {x.id for x in ast.walk(s.test) if isinstance(x, ast.Name)} - {"h"}
            for values in itertools.product([0, 1, 2.5, "tok_emb.weight", None, True], repeat=len(names)):
                assert not eval(ast.unparse(s.test), {"h": h, **dict(zip(sorted(names), values))}), ast.unparse(s.test)
        shipped = pc.prune_source(src, h).decode()
        assert ("timed_eval(\"lora_ttt\"" in shipped) == h.lora_ttt_enabled


def test_a_shipped_file_runs_its_packed_config_and_refuses_others(monkeypatch):
    monkeypatch.setattr(tg, "PINNED", {"num_layers": 5, "matrix_lr": 0.03})
    h = tg.Hyperparameters.from_env({"SEED": "7", "RUN_ID": "x", "COMPILE": "0"})  # free knobs still come from the env
    assert (h.num_layers, h.matrix_lr, h.seed, h.run_id, h.compile, h.model_dim) == (5, 0.03, 7, "x", False, 512)
    assert tg.Hyperparameters.from_env({"NUM_LAYERS": "5", "MATRIX_LR": "0.030"}) == tg.Hyperparameters.from_env({})
    for env, msg in (({"NUM_LAYERS": "6"}, "NUM_LAYERS=6: this train_gpt.py was packed for NUM_LAYERS=5; run the readable"),
                     ({"MODEL_DIM": "256"}, "MODEL_DIM=256: this train_gpt.py was packed for MODEL_DIM=512"),
                     ({"MATRIX_LR": "nan"}, "MATRIX_LR=nan: this train_gpt.py was packed for MATRIX_LR=0.03"),
                     ({"SEED": "-1"}, r"SEED=-1 must lie in \[0,4294967295\]")):
        with pytest.raises(tg.ConfigError, match=msg):
            tg.Hyperparameters.from_env(env)


# Calls into a PRUNE group whose guard is not a knob of the group: each runs only when the group's
# knob was on where the data came from (an artifact's encoding, a module built from the knob) or
# never in the shipped file (counted_code_bytes of a wrapper returns its own length).
DATA_GUARDED = {
    ("decode_artifact", "decode_pergroup"): "the artifact's magic",
    ("dequantize_int", "dequantize_asym"): "the artifact holds LQER factors",
    ("dequantize_int", "awq_scales"): "the artifact's metadata marks an AWQ group",
    ("gptq_quantize", "awq_scales"): "keep is passed only when AWQ_LITE=1",
    ("GPT", "LowRankResidual"): "r = EMBED_ROTATION_RANK",
    ("GPT", "bigram_hash"): "hash_embed exists only with TTT_HASH_EMBED=1",
    ("GPT", "hinted_nll"): "token_nll gets hints only from tilted_nll, which runs only with NGRAM_TILT=1",
    ("lora_nll", "hinted_nll"): "hints come only from tilted_nll and from lora_warmup when NGRAM_TILT=1",
    ("score_nll", "tilted_nll"): "tilt is not None only with NGRAM_TILT=1 (tilt_plan returns None otherwise)",
    ("counted_code_bytes", "readable_code_bytes"): "PINNED is None: the readable source (a shipped file counts its own size)",
    ("Hyperparameters", "check_config"): "PINNED is None: the readable source (a shipped file's config was checked when packed)",
}


def test_prune_groups_are_reached_only_under_their_knobs():
    """Every call into a group from outside it sits under a condition (if, conditional expression,
    loop bound) naming one of the group's knobs, or in a group kept whenever this one is, or is a
    reviewed DATA_GUARDED site. A group keyed to the wrong knob would ship without code a config
    needs, and the run would stop after training."""
    import ast

    tree = ast.parse((REPO / "train_gpt.py").read_text())
    owner = {}
    for knobs, names in pc.PRUNE:
        owner.update({n: (set(knobs), set(names.split())) for n in names.split()})
    problems, seen = [], set()

    def visit(node, top, conds):
        if isinstance(node, ast.Name) and node.id in owner and node.id not in owner.get(top, (None, set()))[1]:
            knobs, _ = owner[node.id]
            kept_with = top in owner and owner[top][0] <= knobs  # top is kept only when this group is
            if not (knobs and any(k in c for c in conds for k in knobs)) and not kept_with:
                seen.add((top, node.id))
                if (top, node.id) not in DATA_GUARDED:
                    problems.append(f"{top} uses {node.id} outside a condition on {sorted(knobs)}")
        guard = []
        if isinstance(node, (ast.If, ast.IfExp, ast.While)):
            guard = [ast.unparse(node.test)]
        elif isinstance(node, (ast.For, ast.comprehension)):
            guard = [ast.unparse(node.iter)]
        for child in ast.iter_child_nodes(node):
            visit(child, top, conds + guard if child is not getattr(node, "test", None) else conds)

    for node in tree.body:
        for name in node_names(node) or [None]:
            visit(node, name, [])
    assert not problems, problems
    assert seen == set(DATA_GUARDED)  # every reviewed site still exists


def without_docs_and_annotations(tree: ast.AST) -> str:
    """The tree less docstrings, the annotations of functions whose decorators do not read them (all but
    custom_op and triton.jit), and the annotations of a def's `x: T = v` locals."""
    class Locals(ast.NodeTransformer):
        def visit_ClassDef(self, n):
            return n  # a class body's annotations are fields

        def visit_AnnAssign(self, n):
            return ast.Assign(targets=[n.target], value=n.value) if n.value else n

    for n in list(ast.walk(tree)):
        body = getattr(n, "body", None)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            n.body = body[1:] or [ast.Pass()]
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n.body = [Locals().visit(s) for s in n.body]
            if not any(isinstance(d, ast.Attribute) and d.attr in ("custom_op", "jit")
                       for x in n.decorator_list for d in ast.walk(x)):
                n.returns = None
                for a in n.args.posonlyargs + n.args.args + n.args.kwonlyargs + [x for x in (n.args.vararg, n.args.kwarg) if x]:
                    a.annotation = None
    return ast.dump(tree)


@pytest.mark.parametrize("path", ["train_gpt.py", "tools/records.py", "data/build_shards.py"])
def test_stripped_source_is_the_same_program(path):
    """Same syntax tree once docstrings and unread annotations are dropped: comments, blank lines and
    indentation are all the stripper may change otherwise."""
    src = (REPO / path).read_bytes()
    out = pc.strip_source(src)
    want, got = without_docs_and_annotations(ast.parse(src)), ast.dump(ast.parse(out))
    at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    same = want == got  # (a plain == on two huge dumps makes pytest diff them for minutes)
    assert same, f"syntax trees differ at {want[max(at - 200, 0):at + 200]!r} vs {got[max(at - 200, 0):at + 200]!r}"
    toks = list(tokenize.tokenize(io.BytesIO(out).readline))
    assert not any(t.type == tokenize.COMMENT for t in toks) and b"\n\n" not in out and len(out) < 0.8 * len(src)


def test_strip_keeps_strings_and_empty_bodies():
    src = b'class E(ValueError):\n    """doc"""\n\n\ndef f(x: int = 1) -> str:  # c\n    s = """a\n\n    # not a comment\n"""\n    return s + "#"\n'
    out = pc.strip_source(src)
    ns = {}
    exec(out, ns)
    assert ns["f"]() == 'a\n\n    # not a comment\n#' and issubclass(ns["E"], ValueError)
    assert out.startswith(b"class E(ValueError):\n pass\ndef f(x = 1):\n s = \"\"\"a\n\n    # not")


def test_train_gpt_holds_the_run_only_in_short_functions_and_sections_in_order():
    """train_gpt.py holds no packer code (it lives here, in tools/), no function over 80 lines, and its
    sections in the order a reader expects, each under the one banner style."""
    src = (REPO / "train_gpt.py").read_text()
    tree = ast.parse(src)
    defs = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert not {"strip_source", "prune_source", "dead_ifs", "pack_source", "shipped_source", "latin1_literal", "minify"} & set(defs)
    assert not {n for n in ("PRUNE", "PACK_HEADS", "_PACK_HEADS") if re.search(rf"^{n} = ", src, re.M)}
    assert max(defs.values()) <= 80, sorted(defs.items(), key=lambda kv: -kv[1])[:3]
    bar = "# " + "-" * 96
    banners = re.findall(rf"^{re.escape(bar)}\n# (.+)\n{re.escape(bar)}$", src, re.M)
    assert banners == ["Hyperparameters", "Distributed & logging", "Data", "Model", "Optimizer", "Quantization & serialization",
                       "Evaluation", "Training", "main"]
    assert src.count("\n# -") == 2 * len(banners)  # no other banner style at the top level
