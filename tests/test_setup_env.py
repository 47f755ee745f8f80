"""run.sh's set-up (tools/setup_env.py): which torch build it installs, the project venv made for an
externally-managed (PEP 668) Python, and the cause it names when pip fails."""
import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import setup_env  # noqa: E402

PKG = "golfcheck_fakepkg"


def make_wheel(d: Path) -> Path:
    """A minimal pure-Python wheel, installable with no index."""
    files = {f"{PKG}/__init__.py": "VALUE = 42\n",
             f"{PKG}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {PKG}\nVersion: 1.0\n",
             f"{PKG}-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{PKG}-1.0.dist-info/RECORD,,")
    path = d / f"{PKG}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr(f"{PKG}-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def fake_managed_python(d: Path) -> Path:
    """A python3 as Debian/Ubuntu ship it: its stdlib directory holds an EXTERNALLY-MANAGED file, so pip
    itself refuses installs, and ensurepip is missing (no python3-venv package), so `python3 -m venv`
    fails unless --without-pip. Made from the real interpreter by pointing sysconfig elsewhere."""
    stdlib, site, bindir = d / "stdlib", d / "site", d / "bin"
    for p in (stdlib, site, bindir):
        p.mkdir(parents=True)
    (stdlib / "EXTERNALLY-MANAGED").write_text("[externally-managed]\nError=use apt or a venv\n")
    (site / "sitecustomize.py").write_text(
        "import os, subprocess, sysconfig, venv\n_get = sysconfig.get_path\n"
        "sysconfig.get_path = lambda name, *a, **k: os.environ['FAKE_STDLIB'] if name == 'stdlib' else _get(name, *a, **k)\n"
        "def _no_ensurepip(self, context):\n"
        "    raise subprocess.CalledProcessError(1, [context.env_exe, '-m', 'ensurepip'])\n"
        "venv.EnvBuilder._setup_pip = _no_ensurepip\n")
    py = bindir / "python3"
    py.write_text(f"#!/bin/sh\nexport PYTHONPATH={site} FAKE_STDLIB={stdlib}\nexec {sys.executable} \"$@\"\n")
    py.chmod(0o755)
    return py


def offline_env(**over) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1", **over)
    return env


@pytest.fixture(scope="module")
def managed(tmp_path_factory):
    d = tmp_path_factory.mktemp("managed")
    py = fake_managed_python(d)
    req = d / "requirements.txt"
    req.write_text(f"{make_wheel(d)}\n")
    venv = d / "repo" / ".venv"
    cmd = [str(py), str(REPO / "tools" / "setup_env.py"), "sweep", "--venv", str(venv), "--requirements", str(req),
           "--need", PKG]
    first = subprocess.run(cmd, env=offline_env(PIP_NO_INDEX="1"), capture_output=True, text=True, timeout=300)
    second = subprocess.run(cmd, env=offline_env(PIP_NO_INDEX="1"), capture_output=True, text=True, timeout=300)
    return py, venv, req, first, second


def test_fake_interpreter_refuses_pip(managed):
    py, _, req, _, _ = managed
    res = subprocess.run([str(py), "-m", "pip", "install", "--no-index", "-r", str(req)], env=offline_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "externally-managed-environment" in res.stdout + res.stderr
    assert setup_env.install_cause(res.stdout + res.stderr)[0].startswith("PEP 668")


def test_managed_python_gets_a_project_venv(managed):
    py, venv, _, first, second = managed
    assert first.returncode == 0, first.stderr[-3000:]
    venv_py = venv / "bin" / "python"
    assert first.stdout.strip() == str(venv_py)
    assert "externally managed (PEP 668)" in first.stderr and "pip install -r" in first.stderr
    assert "no ensurepip here" in first.stderr  # made --without-pip; the system's pip serves it
    check = "import golfcheck_fakepkg, importlib.util as u; print(golfcheck_fakepkg.VALUE, u.find_spec('torch') is not None)"
    assert subprocess.run([str(venv_py), "-c", check], capture_output=True, text=True).stdout.strip() == "42 True"
    # Installed into the venv only; the system's torch is used through --system-site-packages.
    assert subprocess.run([str(py), "-c", "import golfcheck_fakepkg"], capture_output=True).returncode != 0
    # Later runs reuse the venv and install nothing.
    assert second.returncode == 0 and second.stdout == first.stdout
    assert "PEP 668" not in second.stderr and "pip install" not in second.stderr


def test_failed_install_names_the_network(managed, tmp_path):
    py, venv, _, _, _ = managed
    req = tmp_path / "requirements.txt"
    req.write_text("golfcheck-absent==1.0\n")
    # Nothing listens on port 9: the index and any proxy refuse the connection at once.
    env = offline_env(PIP_INDEX_URL="http://127.0.0.1:9/simple", HTTP_PROXY="http://127.0.0.1:9",
                      HTTPS_PROXY="http://127.0.0.1:9")
    res = subprocess.run([str(py), str(REPO / "tools" / "setup_env.py"), "sweep", "--venv", str(venv),
                          "--requirements", str(req), "--need", "golfcheck_absent"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: golfcheck_absent missing and pip could not install them: network:"), last
    assert "PEP 668" not in last


@pytest.mark.parametrize("output, cause", [
    ("error: externally-managed-environment\n\nThis environment is externally managed", "PEP 668"),
    ("ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device", "disk full"),
    ("WARNING: Retrying ... NewConnectionError('Failed to establish a new connection: [Errno 111]')\n"
     "ERROR: No matching distribution found for torch==2.13.0", "network"),
    ("ERROR: Could not install packages due to an OSError: [Errno 13] Permission denied: '/usr/lib'", "no write permission"),
    ("ERROR: No matching distribution found for torch==2.13.0", "the package index has no matching version"),
    ("ERROR: something else", "pip failed"),
])
def test_install_cause(output, cause):
    assert setup_env.install_cause(output)[0].startswith(cause)


@pytest.fixture
def pip_calls(monkeypatch):
    calls, results = [], []
    monkeypatch.setattr(setup_env, "pip", lambda py, args, fast: (calls.append(args), results.pop(0) if results else (0, ""))[1])
    return calls, results


def test_cpu_machine_installs_the_cpu_build(pip_calls, monkeypatch):
    calls, results = pip_calls
    monkeypatch.setattr(setup_env, "gpu_visible", lambda: False)
    setup_env.install_torch("python3", True)
    assert calls == [["--index-url", "https://download.pytorch.org/whl/cpu", "torch==2.13.0"]]
    # The PyTorch index unreachable: the pin from the configured index (package registries carry the CPU wheel).
    calls.clear()
    results.append((1, "Could not fetch URL https://download.pytorch.org/whl/cpu/torch/"))
    setup_env.install_torch("python3", True)
    assert calls[1] == ["torch==2.13.0"]
    calls.clear()
    results.extend([(1, "x"), (1, "Failed to establish a new connection")])
    with pytest.raises(setup_env.SetupError, match="torch could not be installed: network"):
        setup_env.install_torch("python3", True)


def test_gpu_machine_installs_the_default_build(pip_calls, monkeypatch):
    calls, _ = pip_calls
    monkeypatch.setattr(setup_env, "gpu_visible", lambda: True)
    setup_env.install_torch("python3", True)
    assert calls == [["--index-url", "https://download.pytorch.org/whl/cu128", "torch==2.9.1"]]  # the records' build


def test_gpu_machine_gets_fa3_for_its_torch(pip_calls, monkeypatch):
    """An FA3 that fails to import (a wheel built for another torch) is replaced from the PyTorch
    FA3 index of the torch's CUDA version; still broken after that, a warning names the way out."""
    calls, results = pip_calls
    monkeypatch.setattr(setup_env, "gpu_visible", lambda: True)
    status = [("ImportError: undefined symbol: _ZN3c10", "12.8"), ("", "12.8")]
    monkeypatch.setattr(setup_env, "fa3_status", lambda py: status.pop(0))
    setup_env.gpu_extras("python3", "main", (2, 9), True)
    assert calls == [["--index-url", "https://download.pytorch.org/whl/cu128/flash-attn-3/", "flash-attn-3"]]
    calls.clear()
    monkeypatch.setattr(setup_env, "fa3_status", lambda py: ("", "12.8"))
    setup_env.gpu_extras("python3", "main", (2, 9), True)  # importable: nothing to do
    monkeypatch.setattr(setup_env, "fa3_status", lambda py: ("ModuleNotFoundError: flash_attn_interface", "12.6"))
    setup_env.gpu_extras("python3", "test", (2, 9), True)  # the test profile runs on CPU
    assert calls == []
    results.append((1, "ERROR: No matching distribution found for flash-attn-3"))
    setup_env.gpu_extras("python3", "main", (2, 15), True)
    assert calls == [["--index-url", "https://download.pytorch.org/whl/cu126/flash-attn-3/", "flash-attn-3"]]


@pytest.mark.parametrize("script, seen", [("echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)'", True),
                                          ("echo 'NVIDIA-SMI has failed' >&2; exit 9", False), (None, False)])
def test_gpu_visible_reads_nvidia_smi(tmp_path, monkeypatch, script, seen):
    if script is not None:
        smi = tmp_path / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\n{script}\n")
        smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin" if script else str(tmp_path))
    assert setup_env.gpu_visible() is seen


def test_existing_torch_is_left_alone(pip_calls, tmp_path):
    """Everything importable (torch of any build): no pip at all, the same interpreter."""
    calls, _ = pip_calls
    assert setup_env.setup("main", tmp_path / ".venv", REPO / "requirements.txt") == sys.executable
    assert calls == [] and not (tmp_path / ".venv").exists()
