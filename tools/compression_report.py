"""How close is an artifact's compression to the entropy bound, per tensor group and codec? `python3 tools/compression_report.py logs/<run_id>.ptz`

Compression efficiency of an artifact: bytes per tensor group and codec against the entropy bound.

    python tools/compression_report.py logs/<run_id>.ptz [--by kind|module|role]

For each group it prints the raw bytes, the i.i.d. empirical entropy of the stored symbols (int8
codes, or bytes for any other data) and, for every installed codec of the pergroup container
(brotli, lzma, zstd), the size of the group alone and its ratio to the entropy; `best` names the
smallest. Code groups are laid out as the pergroup container stores them (column-major), other
data byte-shuffled. Groups are storage kinds (int6 codes, fp16 row scales, LQER factors, ...), with
--by role the container's streams (the tensor name without its block index), or with --by module
top-level modules (tok_emb, blocks, ...: what each part of the model costs). Either container reads.
"""
import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402


def entropy_bytes(symbols: torch.Tensor) -> float:
    """Empirical Shannon entropy of the symbols times their count, in bytes."""
    flat = symbols.reshape(-1).long()
    counts = torch.bincount(flat - flat.min()).double()
    p = counts[counts > 0] / flat.numel()
    return float(-(p * p.log2()).sum() * flat.numel() / 8)


def groups(tensors: dict, meta: dict, by: str = "kind") -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {}
    if by in ("module", "role"):
        for name, t in tensors.items():
            code = name.endswith(".q") and t.dtype == torch.int8 and t.ndim == 2
            key = name.split(".")[0] if by == "module" else (tg.tensor_role(name) if code else "rest")
            out.setdefault(key, []).append(t)
        return out
    for name in tensors:
        if name.endswith((".lqa", ".lqb", ".lqa_s", ".lqb_s")):
            out.setdefault("lqer factors", []).append(tensors[name])
    for name, m in meta["state"].items():
        if m["kind"] == "sparse":
            out.setdefault("sparse bitmaps", []).append(tensors[name + ".mask"])
            out.setdefault("sparse fp16 values", []).append(tensors[name + ".values"])
            continue
        if m["kind"] == "int":
            out.setdefault(f"int{m['bits']} codes", []).append(tensors[name + ".q"])
            out.setdefault("fp16 row scales", []).append(tensors[name + ".scale"])
            if name + ".bits" in tensors:
                out.setdefault("per-row tier bits", []).append(tensors[name + ".bits"])
        else:
            out.setdefault("fp16 passthrough", []).append(tensors[name])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--by", choices=("kind", "module", "role"), default="kind",
                    help="group by storage kind, by pergroup stream (role) or by top-level module")
    a = ap.parse_args(argv)
    try:
        if not Path(a.artifact).is_file() or Path(a.artifact).stat().st_size > tg.ARTIFACT_MAX_BYTES:
            raise ValueError(f"not a regular file of at most {tg.ARTIFACT_MAX_BYTES} bytes")
        blob = Path(a.artifact).read_bytes()
        tensors, meta = tg.decode_artifact(blob)
        if not isinstance(meta.get("state"), dict) or not all(isinstance(m, dict) and "kind" in m for m in meta["state"].values()):
            raise ValueError("its metadata has no per-tensor state")
        groups(tensors, meta, a.by)
    except (ValueError, OSError, KeyError, tg.ConfigError) as e:
        print(f"error: cannot read artifact {a.artifact}: {e}; give a .ptz written by train_gpt.py", file=sys.stderr)
        return 2
    print(f"artifact_bytes:{len(blob)} container:{'pergroup' if blob[:4] == tg.PERGROUP_MAGIC else 'brotli'}")
    codecs = [(c, fns[0]) for c, fns in ((c, tg.codec_fns(c)) for c in tg.CODECS) if fns]
    for g, ts in groups(tensors, meta, a.by).items():
        codes = all(t.dtype == torch.int8 and t.ndim == 2 for t in ts)
        raw = b"".join((t.T if codes else t).contiguous().numpy().tobytes() for t in ts)
        symbols = torch.frombuffer(bytearray(raw), dtype=torch.int8 if codes else torch.uint8) if raw else torch.zeros(1)
        ent = max(entropy_bytes(symbols), 1.0)
        data = raw if codes else tg.byte_shuffle(raw)
        sizes = {c: len(fn(data)) for c, fn in codecs}
        print(f"group:{g.replace(' ', '_')} tensors:{len(ts)} raw_bytes:{len(raw)} entropy_bytes:{ent:.0f} "
              + " ".join(f"{c}_bytes:{n} {c}_ratio:{n / ent:.4f}" for c, n in sizes.items()) + f" best:{min(sizes, key=sizes.get)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
