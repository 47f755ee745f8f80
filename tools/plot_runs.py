"""How do runs' training loss and val_bpb compare, as a PNG? `python3 tools/plot_runs.py logs/a.txt logs/b.txt --out curves.png`

Plot training loss and val_bpb of one or several runs from their logs to a PNG.

    python tools/plot_runs.py logs/a.txt logs/b.txt --out curves.png [--x step|time]
    python tools/plot_runs.py logs/a.txt records/track_10min_16mb/<record>/train_seed42.log --out c.png

Left: train_loss per logged step. Right: the periodic `step:.. val_bpb` points as lines, and each
final_<stage> val_bpb as a marker at the last step (the score, the last stage, is filled). Logs of
the accepted records are read too (tools/runlog.py parse_record_log): their step lines give the
training time in tenths of a minute, and their validation points get the time of the step lines
around them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runlog  # noqa: E402


def curves(r: runlog.RunLog, x: str = "step") -> dict:
    """The series plotted for one run: train (xs, losses), val (xs, bpbs), finals [(stage, x, bpb)]."""
    xi = 0 if x == "step" else 2
    vxi = 0 if x == "step" else 3
    end = (r.train_steps if x == "step" else r.train_time_s)
    if end is None:  # unfinished training: the last logged point
        end = r.train_points[-1][xi] if r.train_points else 0
    val = [p for p in r.val_points if p[vxi] is not None]  # a record's val point outside its step lines
    return {
        "train": ([p[xi] for p in r.train_points], [p[1] for p in r.train_points]),
        "val": ([p[vxi] for p in val], [p[2] for p in val]),
        "finals": [(s.name, end, s.val_bpb) for s in r.stages.values()],
    }


def plot(runs: list[runlog.RunLog], out: Path, x: str = "step") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(12, 4.5))
    markers = "osD^v<>p*h"
    for i, r in enumerate(runs):
        c = curves(r, x)
        color = f"C{i % 10}"
        name = r.run_id or Path(r.path).stem
        if r.record_log and len(name) > 40:  # record folders are named <date>_<long title>
            name = f"{Path(r.path).parent.name[:10]}/{Path(r.path).stem}"
        ax_loss.plot(*c["train"], color=color, label=name)
        if c["val"][0]:
            ax_bpb.plot(*c["val"], color=color, marker=".", label=f"{name} (live weights)")
        for j, (stage, xs, bpb) in enumerate(c["finals"]):
            last = j == len(c["finals"]) - 1
            ax_bpb.scatter([xs], [bpb], marker=markers[j % len(markers)], edgecolors=color,
                           facecolors=color if last else "none",
                           label=f"{name} {stage if r.record_log else 'final_' + stage}")
    xlabel = "step" if x == "step" else "training time (s)"
    ax_loss.set(xlabel=xlabel, ylabel="train_loss (nats/token)", title="training loss")
    ax_bpb.set(xlabel=xlabel, ylabel="val_bpb", title="validation bits per byte")
    for ax in (ax_loss, ax_bpb):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


FORMATS = (".png", ".pdf", ".svg")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--out", required=True, help="PNG path")
    ap.add_argument("--x", choices=("step", "time"), default="step")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if out.is_dir() or out.suffix.lower() not in FORMATS:  # matplotlib would write <folder>.png or raise
        print(f"error: --out {a.out} is {'a folder' if out.is_dir() else 'not an image file name'}; give a file path "
              f"ending in {', '.join(FORMATS)}, e.g. {out / 'curves.png' if out.is_dir() else out.with_suffix('.png')}",
              file=sys.stderr)
        return 2
    try:
        runs = [runlog.read_log(p) for p in a.logs]
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    empty = [r.path for r in runs if not r.train_points and not r.stages]
    if empty:
        print(f"error: {empty[0]} has no step lines with train_loss and no line with val_bpb to plot", file=sys.stderr)
        return 2
    try:
        print(f"plot:{plot(runs, out, a.x)} runs:{len(runs)}")
    except OSError as e:
        print(f"error: cannot write --out {a.out} ({e.strerror}); choose a writable file path", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
