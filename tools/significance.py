"""Is our mean score lower than a reference by more than a margin? One-sided t-tests on seeds.

    python tools/significance.py OURS... --reference-bpb 1.0810            # one-sample t-test
    python tools/significance.py OURS... --reference-seeds 1.0808,1.0810,1.0812   # Welch
    python tools/significance.py OURS... --reference records/track_10min_16mb/<folder>  # Welch

OURS is a records folder (its submission.json) or run logs. The hypothesis tested is
H1: mean(reference) - mean(ours) > margin, for a margin in nats per token (default 0.005, the
record rule) and the same margin in BPB: margin_bpb = margin_nats * tokens / (bytes * ln 2), with
tokens and bytes from our logged `val_tokens:<n> val_bytes:<n>`. Reference seeds give Welch's test
(unequal variances, Welch-Satterthwaite df); a reference mean alone gives the one-sample test.
A record needs p < 0.01.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runlog  # noqa: E402

P_THRESHOLD = 0.01
DEFAULT_MARGIN_NATS = 0.005  # record rule: >= 0.005 nats better at p < 0.01 (SPEC 5.6)


# --- Student t tail --------------------------------------------------------------------------

def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for coef in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + coef * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + coef / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1 - math.exp(log_front) * _beta_cf(b, a, 1 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df (possibly fractional) degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t > 0 else 1 - tail


# --- tests -----------------------------------------------------------------------------------

def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n-1 denominator; 0 for one value)."""
    n = len(xs)
    m = sum(xs) / n
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0


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


def _finish(kind, ours, ref_n, ref_mean, margin, effect, se, df) -> TestResult:
    if se == 0:  # no spread at all: the claim holds or fails outright
        t = math.inf if effect > 0 else -math.inf
    else:
        t = effect / se
    return TestResult(kind, len(ours), ref_n, sum(ours) / len(ours), ref_mean, margin, t, df, t_sf(t, df))


def welch_improvement(ours: list[float], ref: list[float], margin: float) -> TestResult:
    """Welch's one-sided test of mean(ref) - mean(ours) > margin."""
    if len(ours) < 2 or len(ref) < 2:
        raise ValueError(f"Welch's test needs >= 2 values on each side (ours {len(ours)}, reference {len(ref)})")
    (mo, so), (mr, sr) = mean_std(ours), mean_std(ref)
    vo, vr = so * so / len(ours), sr * sr / len(ref)
    df = (vo + vr) ** 2 / (vo * vo / (len(ours) - 1) + vr * vr / (len(ref) - 1)) if vo + vr > 0 else len(ours) + len(ref) - 2
    return _finish("welch", ours, len(ref), mr, margin, mr - mo - margin, math.sqrt(vo + vr), df)


def one_sample_improvement(ours: list[float], ref_mean: float, margin: float) -> TestResult:
    """One-sample one-sided test of ref_mean - mean(ours) > margin (the reference is a fixed number)."""
    if len(ours) < 2:
        raise ValueError(f"the t-test needs >= 2 seeds of ours, got {len(ours)}")
    mo, so = mean_std(ours)
    return _finish("one_sample", ours, 0, ref_mean, margin, ref_mean - mo - margin, so / math.sqrt(len(ours)), len(ours) - 1)


@dataclass
class Scores:
    """Per-seed scores of one side: BPB always, nats per token when known, and the val counts."""
    label: str
    bpb: list[float]
    nats: list[float] | None = None
    val_tokens: int | None = None
    val_bytes: int | None = None


def compare(ours: Scores, ref: Scores | float, margin_nats: float = DEFAULT_MARGIN_NATS) -> dict:
    """Both tests (BPB and nats) of ours against ref (seeds or a mean in BPB). The nats<->BPB factor
    comes from our val_tokens/val_bytes; a reference without nats is converted with it."""
    if not (ours.val_tokens and ours.val_bytes and ours.nats):
        raise ValueError("our scores lack val_tokens/val_bytes or val_loss (need the `val_tokens:<n> val_bytes:<n>` "
                         "and final_<stage> val_loss lines)")
    factor = runlog.nats_to_bpb_factor(ours.val_tokens, ours.val_bytes)
    margin_bpb = margin_nats * factor
    out = {"margin_nats": margin_nats, "margin_bpb": margin_bpb, "bpb_per_nat": factor,
           "val_tokens": ours.val_tokens, "val_bytes": ours.val_bytes}
    if isinstance(ref, Scores):
        ref_nats = ref.nats or [b / factor for b in ref.bpb]
        out["reference_nats_converted"] = not ref.nats
        if len(ref.bpb) >= 2:
            out["bpb"] = welch_improvement(ours.bpb, ref.bpb, margin_bpb).as_dict()
            out["nats"] = welch_improvement(ours.nats, ref_nats, margin_nats).as_dict()
            return out
        ref = ref.bpb[0]  # a single reference seed is a fixed number
    out["reference_nats_converted"] = True
    out["bpb"] = one_sample_improvement(ours.bpb, ref, margin_bpb).as_dict()
    out["nats"] = one_sample_improvement(ours.nats, ref / factor, margin_nats).as_dict()
    return out


# --- inputs ----------------------------------------------------------------------------------

def scores_from_logs(paths: list[str], label: str = "") -> Scores:
    runs = [runlog.read_log(p) for p in paths]
    for r in runs:
        if r.missing():
            raise ValueError(f"log {r.path} is incomplete: {r.missing()[0]}")
    counts = {(r.val_tokens, r.val_bytes) for r in runs}
    if len(counts) != 1:
        raise ValueError(f"logs scored different validation sets (val_tokens, val_bytes): {sorted(counts)}")
    (tokens, nbytes), = counts
    return Scores(label or ", ".join(paths), [r.score.val_bpb for r in runs], [r.score.val_loss for r in runs],
                  tokens, nbytes)


def scores_from_folder(folder: str) -> Scores:
    """A records folder: its submission.json (our schema)."""
    p = Path(folder) / "submission.json"
    if not p.is_file():
        raise ValueError(f"{folder} has no submission.json; pass its logs or --reference-seeds instead")
    sub = json.loads(p.read_text(encoding="utf-8"))
    try:
        seeds = sub["per_seed"]
        return Scores(str(folder), [s["val_bpb"] for s in seeds], [s["val_loss"] for s in seeds],
                      sub.get("val_tokens"), sub.get("val_bytes"))
    except (KeyError, TypeError):
        raise ValueError(f"{p} is not in the tools/submission.schema.json format (per_seed val_bpb/val_loss)") from None


def load_scores(items: list[str]) -> Scores:
    if len(items) == 1 and Path(items[0]).is_dir():
        return scores_from_folder(items[0])
    return scores_from_logs(items)


def report_lines(ours: Scores, ref_desc: str, res: dict) -> list[str]:
    kind = res["bpb"]["test"]
    lines = [f"ours:{ours.label} n:{res['bpb']['n_ours']}",
             f"reference:{ref_desc} n:{res['bpb']['n_ref'] or 'mean'}",
             "test:" + ("welch one-sided (unequal variances)" if kind == "welch"
                        else "one-sample one-sided (reference is a fixed mean, no reference seeds)")
             + " h1:mean(reference)-mean(ours)>margin",
             f"margin nats:{res['margin_nats']:.6f} bpb:{res['margin_bpb']:.6f} "
             f"bpb_per_nat:{res['bpb_per_nat']:.8f} val_tokens:{res['val_tokens']} val_bytes:{res['val_bytes']}"]
    for unit in ("bpb", "nats"):
        r = res[unit]
        lines.append(f"{unit} ours_mean:{r['ours_mean']:.8f} ref_mean:{r['ref_mean']:.8f} improvement:{r['improvement']:+.8f} "
                     f"t:{r['t']:.4f} df:{r['df']:.2f} p:{r['p']:.3g} clears_p<0.01:{'yes' if r['clears_p_0_01'] else 'no'}")
    if res.get("reference_nats_converted"):
        lines.append("note: reference nats converted from its BPB with our bpb_per_nat")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ours", nargs="+", help="a records folder, or run logs")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--reference", help="reference records folder (submission.json) or one of its logs")
    g.add_argument("--reference-seeds", help="comma-separated reference val_bpb per seed (Welch)")
    g.add_argument("--reference-bpb", type=float, help="reference mean val_bpb (one-sample test)")
    ap.add_argument("--margin-nats", type=float, default=DEFAULT_MARGIN_NATS)
    ap.add_argument("--json", help="also write the result as JSON here")
    a = ap.parse_args()
    try:
        ours = load_scores(a.ours)
        if a.reference:
            ref = load_scores([a.reference])
            desc = a.reference
        elif a.reference_seeds:
            ref = Scores("seeds", [float(x) for x in a.reference_seeds.split(",") if x.strip()])
            desc = f"seeds {a.reference_seeds}"
        else:
            ref, desc = a.reference_bpb, f"mean {a.reference_bpb}"
        res = compare(ours, ref, a.margin_nats)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(report_lines(ours, desc, res)))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
