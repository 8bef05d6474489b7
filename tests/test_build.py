"""Where the compiled extension comes from (rlhf_fast/_build.py, rlhf_fast/_compiled.py): the AOT build,
the first-use (JIT) cache, RLHF_FAST_BUILD, the torch-version stamp, the lock, and what a user is told.
No test compiles the extension (minutes): the real first-use build runs in .ci/install_check.sh; here the
cache is filled with the AOT library, or with files that must never be loaded."""
import importlib.machinery
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from rlhf_fast import _build, _compiled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = ("import torch, rlhf_fast as rf\n"
         "print('CPU:', rf.available_backends()['cpu'])\n"
         "x = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)\n"
         "print('LOGP:', float(rf.logprobs(x, torch.tensor([3]))[0]))\n")
LOGP = 3.0 - torch.logsumexp(torch.arange(4.0, dtype=torch.float64), 0).item()


def _run(code, tmp_path, pythonpath=ROOT, **env):
    """A fresh interpreter (the extension loads at import); returns (stdout lines, rlhf_fast's stderr lines)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_FAST_")}
    e.update(PYTHONPATH=pythonpath, RLHF_FAST_CUDA="0", RLHF_FAST_CACHE_DIR=str(tmp_path / "cache"), **env)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines(), [ln for ln in p.stderr.splitlines() if ln.startswith("rlhf_fast:")]


def _out(lines, key):
    return next(ln[len(key) + 2:] for ln in lines if ln.startswith(key + ":"))


def _cache_dir(tmp_path, csrc=os.path.join(ROOT, "csrc")):
    """The cache folder a CPU-only first-use build of ``csrc`` gets in _run's environment."""
    key = _build.cache_key(torch.__version__, False, "", _build.source_hash(csrc))
    return tmp_path / "cache" / key


def _fake_library(path, torch_version):
    """Not a loadable library (loading it would raise), stamped as built against ``torch_version``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x7fNOT-ELF" + b"\0" * 64 + f"{_build.STAMP_MARK}{_build.stamp(torch_version, False, 'x')};".encode()
                + b"\0" * 16)


def _installed_copy(tmp_path):
    """The package as a wheel installs it (sources in rlhf_fast/_csrc, no AOT library) under tmp/site."""
    site = tmp_path / "site"
    shutil.copytree(os.path.join(ROOT, "rlhf_fast"), site / "rlhf_fast",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "_csrc"))
    shutil.copytree(os.path.join(ROOT, "csrc"), site / "rlhf_fast" / "_csrc")
    return site


needs_aot = pytest.mark.skipif(_compiled.ORIGIN != "aot", reason="needs the extension built at install (make setup)")


def test_stamp_of_the_aot_build():
    if _compiled.ORIGIN is None:
        pytest.skip("no compiled extension loaded")
    st = _build.read_stamp(_compiled.LIBRARY)
    assert st["torch"] == torch.__version__
    assert st["cuda"] == str(int(_compiled.has_kernel("gae_fwd", "CUDA")))
    assert rf_available("cpu").startswith(f"ok (built {'at install' if _compiled.ORIGIN == 'aot' else 'on first'}")


def rf_available(b):
    import rlhf_fast as rf
    return rf.available_backends()[b]


def test_read_stamp(tmp_path):
    lib = tmp_path / "lib.so"
    _fake_library(lib, "9.9.9+cu999")
    assert _build.read_stamp(str(lib)) == {"torch": "9.9.9+cu999", "cuda": "0", "src": "x"}
    (tmp_path / "plain.so").write_bytes(b"\x7fELF no stamp here")
    assert _build.read_stamp(str(tmp_path / "plain.so")) is None


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("RLHF_FAST_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _build.cache_root() == str(tmp_path / "home" / ".cache" / "rlhf_fast")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _build.cache_root() == str(tmp_path / "xdg" / "rlhf_fast")
    monkeypatch.setenv("RLHF_FAST_CACHE_DIR", str(tmp_path / "mine"))
    assert _build.cache_root() == str(tmp_path / "mine")
    # one folder per torch version, Python, CPU / CUDA archs and sources
    keys = {_build.cache_key(v, c, a, s) for v in ("2.14.1+cu130", "2.14.1+cpu")
            for c, a in ((False, ""), (True, "9.0")) for s in ("abc", "abd")}
    assert len(keys) == 8 and all(f"py{sys.version_info[0]}{sys.version_info[1]}" in k for k in keys)
    assert all("/" not in k for k in keys)


def test_source_hash_follows_every_source(tmp_path):
    csrc = tmp_path / "csrc"
    shutil.copytree(os.path.join(ROOT, "csrc"), csrc)
    h = _build.source_hash(str(csrc))
    assert h == _build.source_hash(os.path.join(ROOT, "csrc"))
    for name in ("ops.cpp", "row_math.cuh"):
        p = csrc / name
        p.write_text(p.read_text() + "\n// edited\n")
        assert _build.source_hash(str(csrc)) != h
        h = _build.source_hash(str(csrc))


def test_build_mode_values(monkeypatch, tmp_path):
    for m in _build.MODES:
        monkeypatch.setenv("RLHF_FAST_BUILD", m.upper())
        assert _build.build_mode() == m
    monkeypatch.setenv("RLHF_FAST_BUILD", "sometimes")
    with pytest.raises(ValueError, match=r"RLHF_FAST_BUILD must be one of auto\|aot\|jit\|none, got 'sometimes'"):
        _build.build_mode()


def test_build_none(tmp_path):
    out, said = _run(CHECK, tmp_path, RLHF_FAST_BUILD="none")
    assert "RLHF_FAST_BUILD=none" in _out(out, "CPU") and not _out(out, "CPU").startswith("ok")
    assert float(_out(out, "LOGP")) == pytest.approx(LOGP, abs=1e-12) and said == []


@needs_aot
def test_first_use_build_is_loaded_from_the_cache(tmp_path):
    """A cached first-use build is loaded without compiling (the AOT library stands in for it)."""
    d = _cache_dir(tmp_path)
    d.mkdir(parents=True)
    shutil.copy(_compiled.LIBRARY, d / (_build.JIT_NAME + ".so"))
    (d / "ok").touch()
    out, said = _run(CHECK + "from rlhf_fast import _compiled; print('ORIGIN:', _compiled.ORIGIN)\n"
                     "lg = torch.randn(5, 33, dtype=torch.float64, requires_grad=True)\n"
                     "lb = torch.randint(0, 33, (5,))\n"
                     "a = rf.logprobs(lg, lb, backend='cpu'); r = rf.logprobs(lg, lb, backend='reference')\n"
                     "ga, = torch.autograd.grad(a.sum(), lg); gr, = torch.autograd.grad(r.sum(), lg)\n"
                     "print('DIFF:', float((a - r).abs().max()), float((ga - gr).abs().max()))\n",
                     tmp_path, RLHF_FAST_BUILD="jit", CXX="/nonexistent/c++")  # no compiler needed to load
    assert _out(out, "CPU") == f"ok (built on first use, cached in {d})" and _out(out, "ORIGIN") == "jit"
    assert all(float(v) < 1e-12 for v in _out(out, "DIFF").split()) and said == []


def test_a_library_for_another_torch_is_never_loaded(tmp_path):
    """Cache: a library whose stamp names another torch is reported, not loaded (loading it would raise)."""
    d = _cache_dir(tmp_path)
    _fake_library(d / (_build.JIT_NAME + ".so"), "1.0.0")
    (d / "ok").touch()
    out, said = _run(CHECK, tmp_path, RLHF_FAST_BUILD="jit")
    assert f"it was built against torch 1.0.0, this is torch {torch.__version__}" in _out(out, "CPU")
    assert float(_out(out, "LOGP")) == pytest.approx(LOGP, abs=1e-12)


@pytest.mark.parametrize("mode", ["auto", "aot"])
def test_aot_build_for_another_torch(tmp_path, mode):
    """An installed _C built against another torch: never loaded; auto says so and builds on first use
    (here without a compiler: one line more, and the ops run on the reference); aot says how to rebuild."""
    site = _installed_copy(tmp_path)
    _fake_library(site / "rlhf_fast" / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0]), "1.0.0")
    out, said = _run(CHECK, tmp_path, pythonpath=str(site), RLHF_FAST_BUILD=mode, CXX="/nonexistent/c++")
    mismatch = f"is not loaded: it was built against torch 1.0.0, this is torch {torch.__version__}"
    assert float(_out(out, "LOGP")) == pytest.approx(LOGP, abs=1e-12)
    if mode == "aot":
        assert mismatch in _out(out, "CPU") and "rebuild with `pip install --no-build-isolation .`" in _out(out, "CPU")
        assert said == []
    else:
        assert len(said) == 2, said
        assert mismatch in said[0] and said[0].endswith("building it on first use instead")
        assert said[1] == ("rlhf_fast: cannot build the C++ extension on first use: no C++ compiler "
                           "('/nonexistent/c++' is not on PATH; set CXX or install g++/clang); the ops run on the "
                           "reference/Triton backends meanwhile")
        assert "no C++ compiler" in _out(out, "CPU")


def test_installed_without_aot_build_and_no_compiler(tmp_path):
    """What a plain `pip install` gives on a machine without a compiler: one line, the ops still run."""
    out, said = _run(CHECK, tmp_path, pythonpath=str(_installed_copy(tmp_path)), CXX="/nonexistent/c++")
    assert len(said) == 1 and "no C++ compiler" in said[0] and "reference/Triton backends meanwhile" in said[0]
    assert float(_out(out, "LOGP")) == pytest.approx(LOGP, abs=1e-12)


def test_an_earlier_failed_build_is_not_retried(tmp_path):
    site = _installed_copy(tmp_path)
    d = _cache_dir(tmp_path, str(site / "rlhf_fast" / "_csrc"))
    d.mkdir(parents=True)
    (d / "failed").touch()
    (d / "build.log").write_text("error: something\n")
    out, said = _run(CHECK, tmp_path, pythonpath=str(site))
    assert said == [f"rlhf_fast: the first-use build in {d} failed before (see {d}/build.log); the ops run on the "
                    f"reference/Triton backends meanwhile; delete {d} to retry"]
    assert float(_out(out, "LOGP")) == pytest.approx(LOGP, abs=1e-12)


LOCKER = ("import sys, time; sys.path.insert(0, {root!r}); from rlhf_fast import _build\n"
          "with _build.file_lock({lock!r}):\n"
          "    open({log!r}, 'a').write('in %s\\n' % sys.argv[1]); time.sleep(float(sys.argv[2]))\n"
          "    open({log!r}, 'a').write('out %s\\n' % sys.argv[1])\n")


def test_file_lock_between_processes(tmp_path):
    """Processes starting at once (torchrun ranks) take the build lock one at a time; a holder that is
    killed releases it."""
    code = LOCKER.format(root=ROOT, lock=str(tmp_path / "x.lock"), log=str(tmp_path / "log"))
    ps = [subprocess.Popen([sys.executable, "-c", code, str(i), "0.3"]) for i in range(3)]
    assert all(p.wait() == 0 for p in ps)
    lines = (tmp_path / "log").read_text().split()
    pairs = list(zip(lines[0::4], lines[1::4], lines[2::4], lines[3::4]))
    assert len(pairs) == 3 and all(a == "in" and c == "out" and b == d for a, b, c, d in pairs)  # never interleaved
    holder = subprocess.Popen([sys.executable, "-c", code, "h", "60"])
    while "in h" not in (tmp_path / "log").read_text():
        time.sleep(0.05)
    holder.kill()
    holder.wait()
    t = time.time()
    subprocess.run([sys.executable, "-c", code, "n", "0"], check=True, timeout=60)
    assert time.time() - t < 30 and (tmp_path / "log").read_text().endswith("in n\nout n\n")
