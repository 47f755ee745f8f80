"""Compression efficiency of an artifact: compressed bytes per tensor group against the entropy bound.

    python tools/compression_report.py logs/<run_id>.ptz [--by kind|module]

For each group it prints the raw bytes, the i.i.d. empirical entropy of the stored symbols (int8
codes, or bytes for any other data), the brotli-11 size of the group alone (byte-shuffled like the
artifact) and the ratio to the entropy. Groups are storage kinds (int6 codes, int8 codes, fp16 row
scales, fp16 passthrough, sparse bitmaps/values) or, with --by module, top-level modules
(tok_emb, blocks, embed_proj, head_out, ...: what each part of the model costs).
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
    if by == "module":
        for name, t in tensors.items():
            out.setdefault(name.split(".")[0], []).append(t)
        return out
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--by", choices=("kind", "module"), default="kind", help="group by storage kind or by top-level module")
    a = ap.parse_args()
    blob = Path(a.artifact).read_bytes()
    tensors, meta = tg.deserialize_tensors(tg.decompress_artifact(blob))
    print(f"artifact_bytes:{len(blob)}")
    for g, ts in groups(tensors, meta, a.by).items():
        raw = b"".join(t.contiguous().numpy().tobytes() for t in ts)
        codes = all(t.dtype == torch.int8 for t in ts)
        symbols = torch.frombuffer(bytearray(raw), dtype=torch.int8 if codes else torch.uint8) if raw else torch.zeros(1)
        comp = len(tg.compress_artifact(raw))
        ent = entropy_bytes(symbols)
        print(f"group:{g.replace(' ', '_')} tensors:{len(ts)} raw_bytes:{len(raw)} entropy_bytes:{ent:.0f} "
              f"brotli_bytes:{comp} ratio:{comp / max(ent, 1):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
