"""Write the counted (shipped) form of train_gpt.py for the config in the environment.

    [PRESET=... KNOB=...] python tools/pack_code.py [--src train_gpt.py] --out records/.../train_gpt.py

The config is read as the run reads it (PRESET, then env vars), so set the same env as the run.
The wrapper (raw LZMA2 or brotli in a latin-1 string literal) runs train_gpt.shipped_source with exec:
the definitions and if-blocks that config cannot reach left out (train_gpt.PRUNE, dead_ifs),
docstrings, comments and unread annotations removed, functions, constants and locals renamed,
whitespace squeezed. It runs that config only: every knob but train_gpt.FREE_KNOBS is pinned to its
packed value. Its size is what the run logs as counted_code_bytes (code_packed:1). The readable file
stays the source of truth.
"""
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(REPO / "train_gpt.py"))
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    try:
        if not Path(a.src).is_file():
            raise train_gpt.ConfigError(f"--src {a.src} is not a file; give the readable train_gpt.py")
        src = Path(a.src).read_bytes()
        if src.startswith(train_gpt._PACK_HEADS):
            raise train_gpt.ConfigError(f"--src {a.src} is already packed; give the readable train_gpt.py it came from")
        if Path(a.out).is_dir():
            raise train_gpt.ConfigError(f"--out {a.out} is a folder; give a file path, e.g. {Path(a.out) / 'train_gpt.py'}")
        h = train_gpt.Hyperparameters.from_env()
        try:
            packed = train_gpt.pack_source(src, h)
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
