"""Is our mean score lower than a reference by more than a margin (one-sided t-tests on seeds)? `python3 tools/significance.py OURS... --reference-bpb B`

    python tools/significance.py OURS... --reference-bpb 1.0810            # one-sample t-test
    python tools/significance.py OURS... --reference-seeds 1.0808,1.0810,1.0812   # Welch
    python tools/significance.py OURS... --reference records/track_10min_16mb/<folder>  # Welch

OURS and --reference are a record folder or run logs. A folder is read as the accepted records
write it: per-seed scores from `seed_results` in its submission.json (a mapping seed -> {val_bpb,
val_loss, ...}, or a list of {seed, val_bpb, ...}), failing that from its *.log / *.txt logs (the
last line with a val_bpb in each: tools/runlog.py). The hypothesis tested is
H1: mean(reference) - mean(ours) > margin, for a margin in nats per token (default 0.005, the
record rule) and the same margin in BPB: margin_bpb = margin_nats * bpb_per_nat, where bpb_per_nat
= tokens / (bytes * ln 2) from our logged `val_tokens:<n> val_bytes:<n>` (or, for a folder without
them, val_bpb / val_loss of our seeds). Reference seeds give Welch's test (unequal variances,
Welch-Satterthwaite df); a reference mean alone gives the one-sample test; both from scipy.stats.
When the reference's val_bpb / val_loss differs from ours (another tokenizer, e.g. CaseOps), its
nats are not comparable and are replaced by its BPB over our bpb_per_nat. A record needs p < 0.01.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import runlog  # noqa: E402

P_THRESHOLD = 0.01
DEFAULT_MARGIN_NATS = 0.005  # the challenge's record rule: >= 0.005 nats better at p < 0.01
SAME_UNITS_RTOL = 1e-3  # bpb/nats ratios closer than this are the same tokenization (5-decimal JSON values)
LOG_SUFFIXES = (".log", ".txt")


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n-1 denominator, as most accepted records; 0 for one value)."""
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


@dataclass
class TestResult:
    kind: str  # "welch" or "one_sample"
    n_ours: int
    n_ref: int  # 0 for a reference mean
    ours_mean: float
    ref_mean: float
    margin: float
    t: float
    df: float
    p: float

    @property
    def improvement(self) -> float:
        return self.ref_mean - self.ours_mean

    @property
    def clears(self) -> bool:
        return self.p < P_THRESHOLD

    def as_dict(self) -> dict:
        return {"test": self.kind, "n_ours": self.n_ours, "n_ref": self.n_ref, "ours_mean": self.ours_mean,
                "ref_mean": self.ref_mean, "improvement": self.improvement, "margin": self.margin,
                "t": self.t, "df": self.df, "p": self.p, "clears_p_0_01": self.clears}


def _degenerate(effect: float) -> tuple[float, float]:
    """No spread on either side: the claim holds or fails outright (scipy would return nan)."""
    return (math.inf, 0.0) if effect > 0 else (-math.inf, 1.0)


def welch_improvement(ours: list[float], ref: list[float], margin: float) -> TestResult:
    """Welch's one-sided test of mean(ref) - mean(ours) > margin (scipy.stats.ttest_ind)."""
    if len(ours) < 2 or len(ref) < 2:
        raise ValueError(f"Welch's test needs >= 2 values on each side (ours {len(ours)}, reference {len(ref)})")
    shifted = [x + margin for x in ours]
    mo, mr = statistics.fmean(ours), statistics.fmean(ref)
    if statistics.pvariance(ours) == 0 and statistics.pvariance(ref) == 0:
        (t, p), df = _degenerate(mr - mo - margin), len(ours) + len(ref) - 2
    else:
        from scipy import stats  # imported here: scipy.stats takes seconds to import

        res = stats.ttest_ind(ref, shifted, equal_var=False, alternative="greater")
        t, p, df = float(res.statistic), float(res.pvalue), float(res.df)
    return TestResult("welch", len(ours), len(ref), mo, mr, margin, t, df, p)


def one_sample_improvement(ours: list[float], ref_mean: float, margin: float) -> TestResult:
    """One-sample one-sided test of ref_mean - mean(ours) > margin (the reference is a fixed number)."""
    if len(ours) < 2:
        raise ValueError(f"the t-test needs >= 2 seeds of ours, got {len(ours)}")
    mo = statistics.fmean(ours)
    if statistics.pvariance(ours) == 0:
        t, p = _degenerate(ref_mean - mo - margin)
    else:
        from scipy import stats

        res = stats.ttest_1samp([x + margin for x in ours], ref_mean, alternative="less")
        t, p = -float(res.statistic), float(res.pvalue)
    return TestResult("one_sample", len(ours), 0, mo, ref_mean, margin, t, float(len(ours) - 1), p)


@dataclass
class Scores:
    """Per-seed scores of one side: BPB always, nats per token when known, the val counts when logged."""
    label: str
    bpb: list[float]
    nats: list[float] | None = None
    val_tokens: int | None = None
    val_bytes: int | None = None
    seeds: list = field(default_factory=list)
    logged_bpb_per_nat: float | None = None  # val_bpb / val_loss of a score line in the folder's logs

    @property
    def bpb_per_nat(self) -> float | None:
        """tokens / (bytes ln 2) from the counts, else val_bpb / val_loss of the seeds or of a log; None
        when nothing gives val_loss."""
        if self.val_tokens and self.val_bytes:
            return runlog.nats_to_bpb_factor(self.val_tokens, self.val_bytes)
        return sum(self.bpb) / sum(self.nats) if self.nats else self.logged_bpb_per_nat


def compare(ours: Scores, ref: Scores | float, margin_nats: float = DEFAULT_MARGIN_NATS) -> dict:
    """Both tests (BPB and nats) of ours against ref (seeds or a mean in BPB). The nats<->BPB factor
    is ours; reference nats in other units (or none) are its BPB over that factor."""
    if not (math.isfinite(margin_nats) and margin_nats >= 0):
        raise ValueError(f"--margin-nats {margin_nats} must be a number >= 0 (a negative margin lets a worse run clear)")
    for side in [ours] + ([ref] if isinstance(ref, Scores) else []):
        if not side.bpb or not all(_number(b) and b > 0 for b in side.bpb):
            raise ValueError(f"{side.label}: val_bpb per seed {side.bpb} must be positive numbers, at least one")
    if not isinstance(ref, Scores) and not (_number(ref) and ref > 0):
        raise ValueError(f"reference val_bpb {ref} must be a positive number")
    factor = ours.bpb_per_nat
    if factor is None:
        raise ValueError(f"{ours.label}: our scores have no val_loss, so the nats margin cannot be put in BPB "
                         "(need `val_tokens:<n> val_bytes:<n>` and val_loss lines, or val_loss per seed)")
    margin_bpb = margin_nats * factor
    out = {"margin_nats": margin_nats, "margin_bpb": margin_bpb, "bpb_per_nat": factor,
           "val_tokens": ours.val_tokens, "val_bytes": ours.val_bytes}
    if isinstance(ref, Scores):
        rf = ref.bpb_per_nat if ref.nats else None
        same = rf is not None and abs(rf / factor - 1) <= SAME_UNITS_RTOL
        ref_nats = ref.nats if same else [b / factor for b in ref.bpb]
        out["reference_nats_converted"] = not same
        if rf is not None and not same:
            out["reference_bpb_per_nat"] = rf  # another tokenizer or validation set: its nats do not compare
        if len(ref.bpb) >= 2:
            out["bpb"] = welch_improvement(ours.bpb, ref.bpb, margin_bpb).as_dict()
            out["nats"] = welch_improvement(ours.nats or [b / factor for b in ours.bpb], ref_nats, margin_nats).as_dict()
            return out
        ref = ref.bpb[0]  # a single reference seed is a fixed number
    out.setdefault("reference_nats_converted", True)
    out["bpb"] = one_sample_improvement(ours.bpb, ref, margin_bpb).as_dict()
    out["nats"] = one_sample_improvement(ours.nats or [b / factor for b in ours.bpb], ref / factor, margin_nats).as_dict()
    return out


# --- inputs ----------------------------------------------------------------------------------

def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def seed_scores(sub: dict) -> list[tuple[object, float, float | None]]:
    """(seed, val_bpb, val_loss or None) from a submission.json: `seed_results` as a mapping seed ->
    {val_bpb, ...} or seed -> val_bpb, or as a list of {seed, val_bpb, ...}; `per_seed` (a list) likewise."""
    entries = sub.get("seed_results", sub.get("per_seed"))
    if isinstance(entries, dict):
        items = list(entries.items())
    elif isinstance(entries, list):
        items = [(e.get("seed"), e) for e in entries if isinstance(e, dict)]
    else:
        return []
    if isinstance(entries, list) and len(items) < len(entries):
        raise ValueError(f"seed_results entry {next(e for e in entries if not isinstance(e, dict))!r} is not an object "
                         "with seed and val_bpb; fix or remove it")
    out = []
    for seed, v in items:
        seed = int(seed) if isinstance(seed, str) and seed.lstrip("-").isdigit() else seed
        bpb, loss = (v, None) if not isinstance(v, dict) else (v.get("val_bpb"), v.get("val_loss"))
        if not _number(bpb) or bpb <= 0 or (loss is not None and not (_number(loss) and loss > 0)):
            raise ValueError(f"seed {seed}: val_bpb {bpb!r}" + ("" if loss is None else f", val_loss {loss!r}")
                             + " is not a positive number; every seed counts, so fix or remove that seed")
        out.append((seed, float(bpb), None if loss is None else float(loss)))
    return out


def positive_count(sub: dict, key: str) -> int | None:
    v = sub.get(key)
    if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
        raise ValueError(f"submission.json {key} is {v!r}, not a positive integer; fix it or remove it")
    return v


def scores_from_logs(paths: list[str], label: str = "") -> Scores:
    """Our logs (finished runs) or a record's logs (each with a line carrying val_bpb)."""
    runs = [runlog.read_log(p) for p in paths]
    for r in runs:
        if r.missing():
            raise ValueError(f"log {r.path} is incomplete: {r.missing()[0]}")
    counts = {(r.val_tokens, r.val_bytes) for r in runs}
    if len(counts) != 1:
        raise ValueError(f"logs scored different validation sets (val_tokens, val_bytes): {sorted(counts, key=str)}")
    (tokens, nbytes), = counts
    nats = [r.score.val_loss for r in runs]
    return Scores(label or ", ".join(map(str, paths)), [r.score.val_bpb for r in runs],
                  None if None in nats else nats, tokens, nbytes, [r.seed for r in runs])


def scores_from_folder(folder: str) -> Scores:
    """A record folder, accepted or ours: submission.json's per-seed scores, failing that its logs."""
    d = Path(folder)
    p = d / "submission.json"
    sub = {}
    if p.is_file():
        try:
            sub = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not JSON: {e}") from None
    rows = seed_scores(sub) if isinstance(sub, dict) else []
    logs = sorted(str(f) for f in d.iterdir() if f.suffix in LOG_SUFFIXES and f.is_file())
    scored = [r for r in map(runlog.read_log, logs) if r.score is not None]
    if rows:
        nats = [n for _, _, n in rows]
        factor = next((r.score.val_bpb / r.score.val_loss for r in scored if r.score.val_loss), None)
        return Scores(str(folder), [b for _, b, _ in rows], None if None in nats else nats,
                      positive_count(sub, "val_tokens"), positive_count(sub, "val_bytes"), [s for s, _, _ in rows], factor)
    if not scored:
        raise ValueError(f"{folder}: no per-seed val_bpb found (looked for seed_results in submission.json and for "
                         f"a line with val_bpb in its {'/'.join('*' + s for s in LOG_SUFFIXES)} logs)")
    return scores_from_logs([r.path for r in scored], str(folder))


def load_scores(items: list[str]) -> Scores:
    if len(items) == 1 and Path(items[0]).is_dir():
        return scores_from_folder(items[0])
    return scores_from_logs(items)


def report_lines(ours: Scores, ref_desc: str, res: dict) -> list[str]:
    kind = res["bpb"]["test"]
    counts = (f"val_tokens:{res['val_tokens']} val_bytes:{res['val_bytes']}" if res["val_bytes"]
              else "(from our val_bpb/val_loss)")
    lines = [f"ours:{ours.label} n:{res['bpb']['n_ours']}",
             f"reference:{ref_desc} n:{res['bpb']['n_ref'] or 'mean'}",
             "test:" + ("welch one-sided (unequal variances)" if kind == "welch"
                        else "one-sample one-sided (reference is a fixed mean, no reference seeds)")
             + " h1:mean(reference)-mean(ours)>margin",
             f"margin nats:{res['margin_nats']:.6f} bpb:{res['margin_bpb']:.6f} "
             f"bpb_per_nat:{res['bpb_per_nat']:.8f} {counts}"]
    for unit in ("bpb", "nats"):
        r = res[unit]
        lines.append(f"{unit} ours_mean:{r['ours_mean']:.8f} ref_mean:{r['ref_mean']:.8f} improvement:{r['improvement']:+.8f} "
                     f"t:{r['t']:.4f} df:{r['df']:.2f} p:{r['p']:.3g} clears_p<0.01:{'yes' if r['clears_p_0_01'] else 'no'}")
    if "reference_bpb_per_nat" in res:
        lines.append(f"note: the reference's val_bpb/val_loss is {res['reference_bpb_per_nat']:.8f} (another tokenizer "
                     "or validation set): its nats are not comparable and were converted from its BPB with our bpb_per_nat")
    elif res.get("reference_nats_converted"):
        lines.append("note: reference nats converted from its BPB with our bpb_per_nat")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ours", nargs="+", help="a record folder, or run logs")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--reference", help="reference record folder (accepted or ours) or one of its logs")
    g.add_argument("--reference-seeds", help="comma-separated reference val_bpb per seed (Welch)")
    g.add_argument("--reference-bpb", type=float, help="reference mean val_bpb (one-sample test)")
    ap.add_argument("--margin-nats", type=float, default=DEFAULT_MARGIN_NATS)
    ap.add_argument("--json", help="also write the result as JSON here")
    a = ap.parse_args(argv)
    try:
        ours = load_scores(a.ours)
        if a.reference:
            ref = load_scores([a.reference])
            desc = a.reference
        elif a.reference_seeds:
            ref = Scores("--reference-seeds", parse_seeds(a.reference_seeds))
            desc = f"seeds {a.reference_seeds}"
        else:
            ref, desc = a.reference_bpb, f"mean {a.reference_bpb}"
        res = compare(ours, ref, a.margin_nats)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(report_lines(ours, desc, res)))
    if a.json:
        try:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            print(f"error: cannot write --json {a.json} ({e.strerror}); choose a writable file path", file=sys.stderr)
            return 2
    return 0


def parse_seeds(text: str) -> list[float]:
    """Comma-separated val_bpb per seed; every item must be a positive number."""
    out = []
    for x in text.split(","):
        try:
            out.append(float(x))
        except ValueError:
            raise ValueError(f"--reference-seeds item {x.strip()!r} is not a number; give comma-separated val_bpb values") from None
    return out


if __name__ == "__main__":
    sys.exit(main())
