#!/usr/bin/env python3
"""Which Python runs train_gpt.py, with what it needs installed? `python3 tools/setup_env.py {main|test|sweep}`

Pick the Python that run.sh uses and install what it is missing; print that interpreter's path.

    python3 tools/setup_env.py {main|test|sweep}     # what ./run.sh calls; messages go to stderr

- torch is installed only when missing (or older than 2.9): when `nvidia-smi -L` lists a GPU, the
  records' build torch==2.9.1 from the PyTorch cu128 index (GPU-tested range 2.9-2.13; a newer torch
  already there is named), then for `main` FlashAttention 3 when `flash_attn_interface` does not
  import: flash-attn-3 from the PyTorch index of the installed torch's CUDA version (a failure warns);
  otherwise the CPU build, torch==2.13.0 from the PyTorch CPU index. Each falls back to the
  configured index (registries that carry the wheel under the plain pin). A torch that is already
  there, CUDA or not, is left alone.
- An interpreter that refuses pip installs (PEP 668: an EXTERNALLY-MANAGED file in its stdlib
  directory, the default on current Debian and Ubuntu) gets a project virtual environment, .venv
  in the repository (ignored by git), made with --system-site-packages so packages the system
  already has (a distribution's CUDA torch, numpy) are used as they are. Later runs use .venv.
- A failed install names its cause from pip's output: PEP 668, disk full, no write permission,
  network, no matching version. Exit status 2 when something required is still missing.
Stdlib only: it runs before anything is installed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TORCH_PIN = "torch==2.13.0"  # the version the test suite runs on
TORCH_MIN = (2, 9)  # requirements.txt: torch>=2.9
# On a GPU: the accepted records' build (2.9.1+cu128) and FlashAttention 3 for it. Tested range for
# GPUs: 2.9 to 2.13 (the records ran 2.9.1; the CUDA-contract tests run 2.13's paths, the >=2.12
# rms_norm autocast policy included).
GPU_TORCH_PIN, GPU_INDEX = "torch==2.9.1", "https://download.pytorch.org/whl/cu128"
GPU_TORCH_MAX = (2, 13)
FA3_INDEX = "https://download.pytorch.org/whl/cu{cu}/flash-attn-3/"  # PyTorch's FA3 wheels (stable ABI, per CUDA)
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CORE = ["torch", "numpy", "sentencepiece", "brotli"]
# profile -> (modules that must import, modules worth a try, extra pip packages, fail fast on no network)
PROFILES = {
    "main": (CORE, ["huggingface_hub", "matplotlib", "python_minifier"], [], True),  # the run counts its code with it
    "sweep": (CORE, ["python_minifier"], [], True),
    # triton (Linux wheels only): the fused-CE kernels run in its CPU interpreter; unpinned, so that the
    # triton a CUDA torch pins is never replaced
    "test": (CORE + ["huggingface_hub", "matplotlib", "scipy", "pytest", "python_minifier"] + ["triton"] * (sys.platform == "linux"),
             [], ["pytest", "triton; platform_system == 'Linux'"], False),
}
# (text in pip's output, cause, fix); the first match wins, so the specific ones come first.
CAUSES = [
    ("externally-managed-environment", "PEP 668: this Python refuses pip installs (externally managed)",
     "create a virtual environment (python3 -m venv .venv) and run again inside it"),
    ("No space left on device", "disk full", "free disk space (pip needs several GB for torch; TMPDIR and PIP_CACHE_DIR move its scratch), then run again"),
    ("[Errno 28]", "disk full", "free disk space, then run again"),
    ("Permission denied", "no write permission to this Python's packages", "use a virtual environment or a Python you own, then run again"),
    ("Failed to establish a new connection", "network: the package index cannot be reached", "connect to the network or set PIP_INDEX_URL to a reachable mirror, then run again"),
    ("Temporary failure in name resolution", "network: the package index's name does not resolve", "connect to the network or set PIP_INDEX_URL to a reachable mirror, then run again"),
    ("Read timed out", "network: the package index timed out", "check the connection, then run again"),
    ("ProxyError", "network: the proxy refused the connection", "check HTTP(S)_PROXY, then run again"),
    ("Could not fetch URL", "network: the package index cannot be reached", "connect to the network or set PIP_INDEX_URL to a reachable mirror, then run again"),
    ("No matching distribution found", "the package index has no matching version for this Python/platform",
     "install the packages of requirements.txt by hand (a CUDA build of torch >= 2.9 on a GPU), then run again"),
]


def say(msg: str) -> None:
    print(f"run.sh: {msg}", file=sys.stderr, flush=True)


class SetupError(Exception):
    """One line for the user: what failed, the cause and the fix."""


def install_cause(output: str) -> tuple[str, str]:
    """(cause, fix) of a failed pip run, read from its output."""
    for text, cause, fix in CAUSES:
        if text in output:
            return cause, fix
    return "pip failed (its output is above)", "fix what it reports, then run again"


def externally_managed() -> bool:
    """True when pip refuses to install into the running interpreter (PEP 668), as pip decides it."""
    in_venv = sys.prefix != sys.base_prefix
    return not in_venv and os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def probe(py: str, modules: list[str]) -> tuple[list[str], tuple[int, ...] | None]:
    """(modules that py cannot find, torch's version or None) without importing anything heavy."""
    code = ("import importlib.util as u, importlib.metadata as m, sys\n"
            "print(' '.join(x for x in sys.argv[1:] if u.find_spec(x) is None))\n"
            "try: print(m.version('torch'))\n"
            "except Exception: print('')")
    res = subprocess.run([py, "-c", code, *modules], capture_output=True, text=True)
    if res.returncode != 0:
        raise SetupError(f"{py} does not run ({(res.stderr.strip().splitlines() or ['no output'])[-1]}); "
                         f"if it is the project's .venv, delete it and run again")
    out = res.stdout.split("\n")
    nums = []
    for part in out[1].split("+")[0].split(".")[:2]:
        nums.append(int("".join(c for c in part if c.isdigit()) or 0))
    return out[0].split(), (tuple(nums) if out[1].strip() else None)


def gpu_visible() -> bool:
    """An NVIDIA GPU this machine's driver lists (torch may not be installed yet)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        res = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0 and "GPU " in res.stdout


def pip(py: str, args: list[str], fast_fail: bool) -> tuple[int, str]:
    """Run `py -m pip install ARGS`, showing its output on stderr; (status, output)."""
    cmd = [py, "-m", "pip", "install", *(["--retries", "1", "--timeout", "15"] if fast_fail else []), *args]
    say(" ".join(["pip install", *args]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        sys.stderr.write(line)
        lines.append(line)
    return proc.wait(), "".join(lines)


def make_venv(venv: Path) -> None:
    """venv with the system's packages visible; without ensurepip (Debian lacking python3-venv) the
    system's pip serves it."""
    base = [sys.executable, "-m", "venv", "--system-site-packages"]
    res = subprocess.run([*base, str(venv)], capture_output=True, text=True)
    if res.returncode != 0:
        out = res.stdout + res.stderr
        if "No space left" in out or "Errno 28" in out:
            raise SetupError(f"cannot create {venv}: disk full; free disk space, then run again")
        shutil.rmtree(venv, ignore_errors=True)
        say("no ensurepip here (Debian/Ubuntu: python3-venv not installed): the venv uses the system's pip")
        res = subprocess.run([*base, "--without-pip", str(venv)], capture_output=True, text=True)
    py = str(venv_python(venv))
    if res.returncode != 0 or subprocess.run([py, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        raise SetupError(f"this Python is externally managed (PEP 668) and cannot make a virtual environment with pip "
                         f"({(res.stderr or res.stdout).strip().splitlines()[-1:] or 'no pip'}); install python3-venv "
                         f"(Debian/Ubuntu: apt install python3-venv), then run again")


def install_torch(py: str, fast_fail: bool) -> None:
    if gpu_visible():
        say(f"NVIDIA GPU visible: installing the records' CUDA build of torch ({GPU_TORCH_PIN}, {GPU_INDEX})")
        rc, out = pip(py, ["--index-url", GPU_INDEX, GPU_TORCH_PIN], fast_fail)
        if rc != 0:
            say(f"{GPU_INDEX} did not serve {GPU_TORCH_PIN}; trying the configured package index")
            rc, out = pip(py, [GPU_TORCH_PIN], fast_fail)
    else:
        say(f"no NVIDIA GPU visible: installing the CPU build of torch ({TORCH_PIN})")
        rc, out = pip(py, ["--index-url", CPU_INDEX, TORCH_PIN], True)
        if rc != 0:
            say(f"the PyTorch CPU index did not serve {TORCH_PIN}; trying the configured package index")
            rc, out = pip(py, [TORCH_PIN], fast_fail)
    if rc != 0:
        cause, fix = install_cause(out)
        raise SetupError(f"torch could not be installed: {cause}; {fix}")


def fa3_status(py: str) -> tuple[str, str]:
    """(error of `import flash_attn_interface` or '', torch's CUDA version or '') in py."""
    code = ("import torch\nprint(torch.version.cuda or '')\ntry:\n import flash_attn_interface\n print('')\n"
            "except Exception as e:\n print(f'{type(e).__name__}: {e}'.replace(chr(10), ' '))")
    res = subprocess.run([py, "-c", code], capture_output=True, text=True)
    lines = res.stdout.split("\n") + ["", ""]
    return (lines[1].strip() if res.returncode == 0 else "torch does not import"), lines[0].strip()


def install_fa3(py: str, fast_fail: bool) -> None:
    """FlashAttention 3 for the installed CUDA torch (DOC_MASK=1 on a GPU stops without it); a failure
    only warns: the run's own error line says what to install."""
    err, cuda = fa3_status(py)
    if not err or not cuda:
        return
    index = FA3_INDEX.format(cu=cuda.replace(".", ""))
    say(f"FlashAttention 3 unusable ({err}): installing flash-attn-3 from {index}")
    rc, out = pip(py, ["--index-url", index, "flash-attn-3"], fast_fail)
    err = fa3_status(py)[0] if rc == 0 else install_cause(out)[0]
    if err:
        say(f"warning: FlashAttention 3 still unusable ({err}); build it from source for this torch "
            f"(github.com/Dao-AILab/flash-attention, hopper/: python setup.py install) or run with SDPA_FALLBACK=1")


def setup(profile: str, venv: Path, requirements: Path, also_need: list[str] = ()) -> str:
    need, want, extra, fast_fail = PROFILES[profile]
    need = need + list(also_need)
    py = str(venv_python(venv)) if venv_python(venv).exists() else sys.executable
    missing, torch_version = probe(py, need + want)
    torch_ok = torch_version is not None and torch_version >= TORCH_MIN
    if not missing and torch_ok:
        gpu_extras(py, profile, torch_version, fast_fail)
        return py
    if py == sys.executable and externally_managed():
        say(f"{sys.executable} is externally managed (PEP 668) and refuses pip installs: using the project "
            f"virtual environment {venv} (system packages stay visible)")
        make_venv(venv)
        py = str(venv_python(venv))
        missing, torch_version = probe(py, need + want)
        torch_ok = torch_version is not None and torch_version >= TORCH_MIN
    if not torch_ok:
        install_torch(py, fast_fail)
    missing, _ = probe(py, need + want)
    if missing:
        rc, out = pip(py, ["-r", str(requirements), *extra], fast_fail)
        if rc != 0:
            still = probe(py, need)[0]
            cause, fix = install_cause(out)
            if still:
                raise SetupError(f"{' '.join(still)} missing and pip could not install them: {cause}; {fix}")
            say(f"pip could not install everything in {requirements.name} ({cause}); the run does not need the rest, going on")
    gpu_extras(py, profile, probe(py, ["torch"])[1], fast_fail)
    return py


def gpu_extras(py: str, profile: str, torch_version, fast_fail: bool) -> None:
    """On a GPU: a torch outside the tested range is named; FA3 installed for the main profile."""
    if not gpu_visible() or torch_version is None:
        return
    if torch_version > GPU_TORCH_MAX:
        say(f"warning: torch {'.'.join(map(str, torch_version))} is newer than the GPU-tested range 2.9-2.13 "
            f"(the records: {GPU_TORCH_PIN}+cu128)")
    if profile == "main":
        install_fa3(py, fast_fail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Set up the Python for run.sh; prints its path.")
    ap.add_argument("profile", choices=sorted(PROFILES))
    ap.add_argument("--venv", type=Path, default=REPO / ".venv", help="project virtual environment (made when needed)")
    ap.add_argument("--requirements", type=Path, default=REPO / "requirements.txt")
    ap.add_argument("--need", nargs="*", default=[], help="modules that must import besides the profile's")
    args = ap.parse_args(argv)
    try:
        print(setup(args.profile, args.venv.absolute(), args.requirements, args.need))
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
