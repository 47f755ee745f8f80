#!/usr/bin/env python3
"""Download the published FineWeb shards and tokenizer from the Hugging Face Hub.

Writes what train_gpt.py reads for VOCAB_SIZE=V, CASEOPS=0 with the default DATA_DIR:
    data/datasets/fineweb10B_spV/fineweb_val_NNNNNN.bin     the whole validation split
    data/datasets/fineweb10B_spV/fineweb_train_NNNNNN.bin   the first --train-shards training shards
    data/datasets/fineweb10B_spV/manifest.json              the repo's manifest (file counts, token counts)
    data/tokenizers/fineweb_V_bpe.model                     the tokenizer that built them

Complete files are skipped without touching the network; a partial download is kept as
<file>.part-<etag> and resumed; every shard is checked the way train_gpt.py reads it (header and
size) before it gets its final name, and the validation split is checked against the manifest's
document and token counts. Without network it stops at once with one line.

The CaseOps export (variant sp8192_lossless_caps_caseops_v1_reserved, alias caseops; the default:
the data of the record config, CASEOPS=1) also brings the validation byte sidecar
fineweb_val_bytes_NNNNNN.bin, one per validation shard and checked against it; train_gpt.py reads it
with TOKENIZER_PATH set to the tokenizer the download prints when that is not the default name.

Examples:
    python3 data/download_fineweb.py                                  # the CaseOps sp8192 export, 80 training shards
    python3 data/download_fineweb.py --variant sp8192                 # the plain sp8192 export (CASEOPS=0)
    python3 data/download_fineweb.py --variant sp1024 --train-shards 10
    python3 data/download_fineweb.py --variant sp8192 --with-docs --train-shards 0   # + docs_selected.jsonl (45 GB)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
# sp1024 is the challenge's own export (data/cached_challenge_fineweb.py); sp4096 and sp8192 are
# the exports of the same documents that the SP4096/SP8192 records download.
DEFAULT_REPOS = {
    "sp1024": "willdepueoai/parameter-golf",
    "sp4096": "kevclark/parameter-golf",
    "sp8192": "kevclark/parameter-golf",
    # The CaseOps export the CaseOps records download (PR #1729, #1855): 50,000 val docs, 1e8-token shards.
    "sp8192_lossless_caps_caseops_v1_reserved": "romeerp/parameter-golf-caseops-v1",
}
ALIASES = {"caseops": "sp8192_lossless_caps_caseops_v1_reserved"}
DEFAULT_PREFIX = "datasets"  # folder of the repo that holds manifest.json, datasets/ and tokenizers/
DEFAULT_TRAIN_SHARDS = 80  # 8e9 tokens, the challenge downloader's default
NUM_VAL_DOCS = 50_000  # the challenge's data/download_hf_docs_and_tokenize.py: the first 50,000 documents are validation
BOS_ID = 1
VARIANT_RE = re.compile(r"sp(\d+)(_[0-9a-z_]+)?")

Log = Callable[[str], None]


def _import_from(folder: Path, module: str):
    """train_gpt (repo root) and build_shards (data/) are imported lazily: this file is run as a script."""
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return __import__(module)


class DownloadError(Exception):
    """A problem the user can act on; the message is one line naming the fix."""


class Item(NamedTuple):
    remote: str  # path inside the repo
    local: Path
    kind: str  # "shard", "tokenizer" or "file"


# ------------------------------------------------------------------------------------------------
# Transport: huggingface_hub for URLs, credentials, metadata and ranged GETs
# ------------------------------------------------------------------------------------------------


class HubFetcher:
    """Fetches single files of one dataset repo, resuming from a .part file left by an earlier try."""

    def __init__(self, repo_id: str, revision: str = "main", endpoint: str | None = None):
        self.repo_id, self.revision, self.endpoint = repo_id, revision, endpoint

    def url(self, remote: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, remote, repo_type="dataset", revision=self.revision, endpoint=self.endpoint)

    def fetch(self, remote: str, dest: Path, verify: Callable[[Path], object], salvage: bool, log: Log) -> int:
        """Download remote to dest and return the bytes transferred.

        The bytes go to dest.part-<etag> (so a part never resumes from another version of the file),
        which is verified and then renamed to dest. With salvage, an existing dest shorter than the
        remote file (a cut-off copy) is resumed instead of downloaded again.
        """
        from huggingface_hub import get_hf_file_metadata
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        url = self.url(remote)
        meta = get_hf_file_metadata(url)
        tag = re.sub(r"[^0-9A-Za-z]", "", meta.etag or "")[:16] or "noetag"
        part = dest.with_name(f"{dest.name}.part-{tag}")
        for stale in dest.parent.glob(f"{dest.name}.part-*"):
            if stale != part:
                stale.unlink()
        if salvage and dest.exists() and meta.size and dest.stat().st_size < meta.size and not part.exists():
            os.replace(dest, part)
        have = part.stat().st_size if part.exists() else 0
        if meta.size is not None and have > meta.size:
            part.unlink()
            have = 0
        if have:
            log(f"resume:{remote} from_bytes:{have}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(part, "ab") as f:
            http_get(url, f, resume_size=have, headers=build_hf_headers(), expected_size=meta.size)
        try:
            verify(part)
        except ValueError as e:
            part.unlink()
            raise DownloadError(f"downloaded {remote} is corrupt ({e}); run the download again") from None
        os.replace(part, dest)
        return dest.stat().st_size - have


def check_network(endpoint: str, timeout: float = 5.0) -> None:
    """Fail fast (one TCP connect, to the proxy if one is configured) instead of waiting on retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise DownloadError("HF_HUB_OFFLINE is set, so nothing can be downloaded; " + OFFLINE_HINT)
    url = urllib.parse.urlsplit(endpoint)
    proxy = None if urllib.request.proxy_bypass(url.hostname or "") else urllib.request.getproxies().get(url.scheme)
    target = urllib.parse.urlsplit(proxy if "://" in (proxy or "") else f"http://{proxy}") if proxy else url
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=timeout).close()
    except OSError as e:
        via = f" via proxy {target.hostname}:{port}" if proxy else ""
        raise DownloadError(f"cannot reach {endpoint}{via} ({e.__class__.__name__}: {e}); no network? " + OFFLINE_HINT) from None


OFFLINE_HINT = (
    "to train without a download: CUDA_VISIBLE_DEVICES= ./run.sh (CPU smoke run on text already on this machine), "
    "or export shards from your own documents with data/build_shards.py --vocab-size V"
)


# ------------------------------------------------------------------------------------------------
# What to download and how to check it
# ------------------------------------------------------------------------------------------------


def vocab_of(variant: str) -> int:
    m = VARIANT_RE.fullmatch(variant)
    if not m:
        raise DownloadError(f"--variant {variant!r} is not of the form sp<VOCAB>[_suffix], e.g. sp1024, sp8192 or caseops")
    return int(m.group(1))


def dataset_name(variant: str) -> str:
    return f"fineweb10B_{variant}"


def has_sidecar(variant: str) -> bool:
    """CaseOps exports score val_bpb on their validation byte sidecar."""
    return "caseops" in variant


def manifest_entry(manifest: dict, variant: str) -> tuple[dict, dict]:
    """The (dataset, tokenizer) entries of the manifest for one variant."""
    datasets = {d.get("name"): d for d in manifest.get("datasets", []) if isinstance(d, dict)}
    entry = datasets.get(dataset_name(variant))
    if entry is None:
        have = ", ".join(sorted(n.removeprefix("fineweb10B_") for n in datasets if n)) or "none"
        raise DownloadError(f"{variant} is not published in this repo (it has: {have}); pick one of those with --variant, "
                            f"another repo with --repo-id, or export it yourself with data/build_shards.py --vocab-size {vocab_of(variant)}")
    tokenizers = {t.get("name"): t for t in manifest.get("tokenizers", []) if isinstance(t, dict)}
    tok = tokenizers.get(entry.get("tokenizer_name"))
    if tok is None or not tok.get("model_path"):
        raise DownloadError(f"the manifest names no tokenizer model for {dataset_name(variant)}; check --repo-id/--remote-prefix")
    return entry, tok


def plan(manifest: dict, variant: str, train_shards: int, prefix: str, data_dir: Path, with_docs: bool = False) -> list[Item]:
    """Every file to have locally, validation first, in download order."""
    entry, tok = manifest_entry(manifest, variant)
    stats = entry.get("stats") or {}
    n_val, n_train = int(stats.get("files_val", 0)), int(stats.get("files_train", 0))
    if n_val < 1:
        raise DownloadError(f"the manifest lists no validation shards for {dataset_name(variant)}; check --repo-id/--remote-prefix")
    if train_shards > n_train:
        raise DownloadError(f"{variant} has {n_train} training shards in this repo; pass --train-shards {n_train} or fewer")
    root = f"{prefix}/" if prefix else ""
    name = dataset_name(variant)
    out = data_dir / "datasets" / name
    splits = (("val", n_val),) + ((("val_bytes", n_val),) if has_sidecar(variant) else ()) + (("train", train_shards),)
    items = [Item(f"{root}datasets/{name}/fineweb_{split}_{i:06d}.bin", out / f"fineweb_{split}_{i:06d}.bin", "shard")
             for split, n in splits for i in range(n)]
    for key, kind in (("model_path", "tokenizer"), ("vocab_path", "file")):
        if tok.get(key):
            items.append(Item(f"{root}{tok[key]}", data_dir / "tokenizers" / Path(tok[key]).name, kind))
    if with_docs:
        items += [Item(f"{root}{n}", data_dir / n, "file") for n in ("docs_selected.source_manifest.json", "docs_selected.jsonl")]
    return items


def verify_shard(path: Path) -> int:
    """Token count of a shard, checked exactly as train_gpt.py reads it (magic, version, size)."""
    return len(_import_from(REPO_ROOT, "train_gpt").read_shard(str(path)))


def verify_tokenizer(path: Path, vocab_size: int) -> None:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"not a SentencePiece model: {' '.join(str(e).split())}") from None
    if sp.vocab_size() != vocab_size:
        raise ValueError(f"{sp.vocab_size()} pieces, expected {vocab_size}")


def verifier(item: Item, vocab_size: int) -> Callable[[Path], object]:
    if item.kind == "shard":
        return verify_shard
    if item.kind == "tokenizer":
        return lambda p: verify_tokenizer(p, vocab_size)
    return lambda p: None


def is_complete(item: Item, vocab_size: int) -> bool:
    """Files only get their final name once complete, so this checks content, not transfer state."""
    if not item.local.is_file():
        return False
    try:
        verifier(item, vocab_size)(item.local)
    except ValueError:
        return False
    return True


def val_summary(paths: Sequence[Path]) -> dict:
    """Documents (BOS count), tokens and token fingerprint of the validation split."""
    read_shard = _import_from(REPO_ROOT, "train_gpt").read_shard
    token_fingerprint = _import_from(DATA_DIR, "build_shards").token_fingerprint
    shards = [read_shard(str(p)) for p in paths]
    return {
        "val_docs": sum(int(np.count_nonzero(s == BOS_ID)) for s in shards),
        "val_tokens": sum(len(s) for s in shards),
        "val_fingerprint": token_fingerprint(shards),
    }


def check_sidecar(val: Sequence[Path], sidecar: Sequence[Path]) -> None:
    """Each fineweb_val_bytes_k.bin holds one entry per token of fineweb_val_k.bin."""
    read_shard = _import_from(REPO_ROOT, "train_gpt").read_shard
    for v, b in zip(val, sidecar):
        if len(read_shard(str(b))) != len(read_shard(str(v))):
            raise DownloadError(f"byte sidecar {b.name} does not match {v.name} in length; delete both and download again")


def check_val(summary: dict, stats: dict) -> None:
    """Refuse a validation split smaller (or larger) than the published one."""
    want_docs = int(stats.get("docs_val", NUM_VAL_DOCS))
    if summary["val_docs"] != want_docs:
        raise DownloadError(f"the validation split has {summary['val_docs']} documents, expected {want_docs}; "
                            "delete its fineweb_val_*.bin files and download again")
    if "tokens_val" in stats and summary["val_tokens"] != int(stats["tokens_val"]):
        raise DownloadError(f"the validation split has {summary['val_tokens']} tokens, the manifest says {stats['tokens_val']}; "
                            "delete its fineweb_val_*.bin files and download again")


# ------------------------------------------------------------------------------------------------
# The download
# ------------------------------------------------------------------------------------------------


def _describe_hub_error(e: Exception, remote: str, repo_id: str) -> str:
    status = getattr(getattr(e, "response", None), "status_code", None)
    first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
    if status in (401, 403, 404):
        return f"{remote} is not available from dataset repo {repo_id} (HTTP {status}); check --repo-id, --remote-prefix and --revision"
    return f"downloading {remote} from {repo_id} failed ({first}); run again to resume"


def download(
    variant: str,
    train_shards: int,
    fetcher: HubFetcher,
    prefix: str = DEFAULT_PREFIX,
    data_dir: Path = DATA_DIR,
    with_docs: bool = False,
    log: Log = print,
) -> dict:
    """Make data_dir hold the variant's validation split, train_shards training shards and tokenizer.

    Uses the cached manifest and skips the network entirely when every file is already complete.
    """
    variant = ALIASES.get(variant, variant)
    vocab = vocab_of(variant)
    if train_shards < 0:
        raise DownloadError(f"--train-shards must be 0 or more (got {train_shards})")
    cache = data_dir / "datasets" / dataset_name(variant) / "manifest.json"
    items = _try_plan(cache, variant, train_shards, prefix, data_dir, with_docs)
    todo = [it for it in items if not is_complete(it, vocab)] if items is not None else None
    if todo != []:
        from huggingface_hub import constants

        check_network(fetcher.endpoint or constants.ENDPOINT)
        _fetch_manifest(fetcher, prefix, cache, log)
        items = _try_plan(cache, variant, train_shards, prefix, data_dir, with_docs, strict=True)
        todo = [it for it in items if not is_complete(it, vocab)]
    log(f"download repo:{fetcher.repo_id} variant:{variant} files:{len(items)} complete:{len(items) - len(todo)} todo:{len(todo)}")
    t0, moved = time.perf_counter(), 0
    for k, item in enumerate(todo, 1):
        t = time.perf_counter()
        try:
            n = fetcher.fetch(item.remote, item.local, verifier(item, vocab), salvage=item.kind == "shard", log=log)
        except DownloadError:
            raise
        except OSError as e:
            if e.errno is None:  # HTTP-level errors of older huggingface_hub versions are OSErrors too
                raise DownloadError(_describe_hub_error(e, item.remote, fetcher.repo_id)) from None
            raise DownloadError(f"writing {item.local} failed ({e}); free space or fix permissions, then run again") from None
        except Exception as e:  # huggingface_hub / HTTP errors; finished files and .part files are kept
            raise DownloadError(_describe_hub_error(e, item.remote, fetcher.repo_id)) from None
        moved += n
        dt = time.perf_counter() - t
        log(f"got {k}/{len(todo)} file:{item.local} bytes:{n} seconds:{dt:.1f} MB/s:{n / 1e6 / max(dt, 1e-9):.1f} "
            f"total_MB:{moved / 1e6:.0f}")
    entry, _ = manifest_entry(json.loads(cache.read_text(encoding="utf-8")), variant)
    val_files = [it.local for it in items if it.local.name.startswith("fineweb_val_") and "_bytes_" not in it.local.name]
    val = val_summary(val_files)
    check_val(val, entry.get("stats") or {})
    if has_sidecar(variant):
        check_sidecar(val_files, [it.local for it in items if it.local.name.startswith("fineweb_val_bytes_")])
    summary = {**val, "train_shards": train_shards, "downloaded_bytes": moved, "seconds": time.perf_counter() - t0,
               "dataset": str(cache.parent), "tokenizer": str(next(it.local for it in items if it.kind == "tokenizer"))}
    # train_gpt.py's default paths name the CaseOps export (CASEOPS=1, the default) or the plain one (CASEOPS=0).
    suffix = variant[len(f"sp{vocab}"):]
    default = suffix in ("", _import_from(REPO_ROOT, "train_gpt").CASEOPS_SUFFIX)
    if not default or Path(summary["tokenizer"]) != data_dir / "tokenizers" / f"fineweb_{vocab}_bpe{suffix}.model":
        log(f"note: the tokenizer is {summary['tokenizer']}; run with TOKENIZER_PATH={summary['tokenizer']}")
    if not default:
        log(f"note: the dataset is {cache.parent}; run with DATA_PATH={cache.parent}")
    elif not suffix:
        log("note: train_gpt.py reads the CaseOps export by default; run with CASEOPS=0 for this one")
    return summary


def _try_plan(cache: Path, variant, train_shards, prefix, data_dir, with_docs, strict: bool = False) -> list[Item] | None:
    if not cache.is_file():
        return None
    try:
        manifest = json.loads(cache.read_text(encoding="utf-8"))
        return plan(manifest, variant, train_shards, prefix, data_dir, with_docs)
    except (ValueError, DownloadError):
        if strict:
            raise
        return None  # a stale or foreign cached manifest: fetch a fresh one


def _fetch_manifest(fetcher: HubFetcher, prefix: str, cache: Path, log: Log) -> None:
    remote = f"{prefix}/manifest.json" if prefix else "manifest.json"

    def parse(path: Path) -> None:
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"not JSON: {e}") from None

    try:
        fetcher.fetch(remote, cache, parse, salvage=False, log=log)
    except DownloadError:
        raise
    except Exception as e:
        raise DownloadError(_describe_hub_error(e, remote, fetcher.repo_id)) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download published FineWeb shards and tokenizers from the Hugging Face Hub.")
    parser.add_argument("--variant", default="caseops",
                        help="caseops (default, the record config's data: sp8192_lossless_caps_caseops_v1_reserved), sp1024, sp4096 or sp8192")
    parser.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS, help="training shards of 1e8 tokens (validation is always whole)")
    parser.add_argument("--repo-id", default=os.environ.get("MATCHED_FINEWEB_REPO_ID"),
                        help="dataset repo (env MATCHED_FINEWEB_REPO_ID; default: per variant, see DEFAULT_REPOS)")
    parser.add_argument("--remote-prefix", default=os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_PREFIX),
                        help="folder of the repo holding manifest.json (env MATCHED_FINEWEB_REMOTE_ROOT_PREFIX)")
    parser.add_argument("--revision", default="main", help="branch, tag or commit of the repo")
    parser.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    parser.add_argument("--data-dir", default=str(DATA_DIR), help="root for datasets/ and tokenizers/ (train_gpt.py DATA_DIR)")
    parser.add_argument("--with-docs", action="store_true", help="also fetch docs_selected.jsonl (45 GB) and its sidecar, to re-export")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, flush=True)

    args.variant = ALIASES.get(args.variant, args.variant)
    try:
        vocab_of(args.variant)
        repo = args.repo_id or DEFAULT_REPOS.get(args.variant)
        if not repo:
            plain = f" (CASEOPS=0 trains on the plain sp{vocab_of(args.variant)})" if has_sidecar(args.variant) else ""
            raise DownloadError(f"no default repo publishes {args.variant}{plain}; pass --repo-id, or export it with "
                                f"data/build_shards.py --vocab-size {vocab_of(args.variant)}")
        if not sys.stderr.isatty():
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()  # tqdm redraws make logs unreadable; we print one line per file
        fetcher = HubFetcher(repo, args.revision, args.endpoint)
        summary = download(args.variant, args.train_shards, fetcher, args.remote_prefix.strip("/"), Path(args.data_dir),
                           args.with_docs, log)
    except DownloadError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    for key in ("dataset", "tokenizer", "train_shards", "val_docs", "val_tokens", "val_fingerprint", "downloaded_bytes"):
        print(f"{key}:{summary[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
