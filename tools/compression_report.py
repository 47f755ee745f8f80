"""Compression efficiency of an artifact: compressed bytes per tensor group against the entropy bound.

    python tools/compression_report.py logs/<run_id>.ptz

For each group (int6 matrices, int8 embedding, fp16 scales, fp16 passthrough) it prints the raw
bytes, the i.i.d. empirical entropy of the stored symbols (codes, or bytes for fp16 data), the
brotli-11 size of the group alone (byte-shuffled like the artifact) and the ratio to the entropy.
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


def groups(tensors: dict, meta: dict) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {}
    for name, m in meta["state"].items():
        if m["kind"] == "int":
            out.setdefault(f"int{m['bits']} codes", []).append(tensors[name + ".q"])
            out.setdefault("fp16 row scales", []).append(tensors[name + ".scale"])
        else:
            out.setdefault("fp16 passthrough", []).append(tensors[name])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    a = ap.parse_args()
    blob = Path(a.artifact).read_bytes()
    tensors, meta = tg.deserialize_tensors(tg.decompress_artifact(blob))
    print(f"artifact_bytes:{len(blob)}")
    for g, ts in groups(tensors, meta).items():
        flat = torch.cat([t.reshape(-1) for t in ts])
        symbols = flat if flat.dtype == torch.int8 else flat.view(torch.uint8)
        raw = flat.numpy().tobytes()
        comp = len(tg.compress_artifact(raw))
        ent = entropy_bytes(symbols)
        print(f"group:{g.replace(' ', '_')} tensors:{len(ts)} raw_bytes:{len(raw)} entropy_bytes:{ent:.0f} "
              f"brotli_bytes:{comp} ratio:{comp / max(ent, 1):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
