"""Write the counted (shipped) form of train_gpt.py: a self-extracting raw-LZMA2 + base85 wrapper.

    python tools/pack_code.py [--src train_gpt.py] [--out records/.../train_gpt.py]

The wrapper runs the exact readable source with exec, so it behaves identically; its size is what
train_gpt.py logs as counted_code_bytes (code_packed:1). The readable file stays the source of truth.
"""
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(REPO / "train_gpt.py"))
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    src = Path(a.src).read_bytes()
    packed = train_gpt.pack_source(src)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_bytes(packed)
    print(f"source_bytes:{len(src)} packed_bytes:{len(packed)} out:{a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
