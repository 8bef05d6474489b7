#!/usr/bin/env bash
# Install rlhf_fast as a user does, in fresh venvs, with no flags (issue 21):
#   1. `python -m build --sdist`: no deprecation warning; the sdist holds csrc (.cpp .cu .h .cuh), the
#      package data and LICENSE;
#   2. venv A: torch (the Makefile's pin), then `pip install rlhf_fast-<v>.tar.gz`; two processes start at
#      once on an empty cache (as torchrun ranks): one builds the C++ extension on first use (CPU only:
#      RLHF_FAST_CUDA=0 keeps CI's time down), the other waits for it; both run an op on the cpu backend
#      against the reference, forward and backward;
#   3. venv B: `pip install .` with torch not installed first (pip brings it, held to the same pin); the
#      extension is loaded from the cache venv A built.
# Each step prints its wall time. Usage: .ci/install_check.sh (PY=python3.x to pick the interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
TORCH=${TORCH:-$(sed -n 's/^TORCH *?= *//p' Makefile)}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export RLHF_FAST_CUDA=0 RLHF_FAST_CACHE_DIR=$WORK/cache PIP_DISABLE_PIP_VERSION_CHECK=1
t0=$SECONDS
step() { echo "== [$((SECONDS - t0))s] $*"; }
fail() { echo "install_check: $*" >&2; exit 1; }
no_warnings() {  # a build log with a warning fails the check (but pip's notes on this machine's index
  # locations, and byte-compiling switched off by PYTHONDONTWRITEBYTECODE)
  if grep -iE "deprecat|warning" "$1" | grep -vE "WARNING: Location .* is ignored|byte-compiling is disabled"; then
    fail "warnings in $1 (above)"
  fi
}

step "sdist"
"$PY" -m venv "$WORK/tools"
"$WORK/tools/bin/pip" install -q build
"$WORK/tools/bin/python" -m build --sdist --outdir "$WORK/dist" . > "$WORK/sdist.log" 2>&1 || { cat "$WORK/sdist.log"; fail "sdist build failed"; }
no_warnings "$WORK/sdist.log"
SDIST=$(ls "$WORK"/dist/rlhf_fast-*.tar.gz)
tar tzf "$SDIST" > "$WORK/sdist.txt"
for f in $(cd "$ROOT" && git ls-files 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.h' 'csrc/*.cuh' 'rlhf_fast/train/data/*') LICENSE; do
  grep -q "^rlhf_fast-[^/]*/$f\$" "$WORK/sdist.txt" || fail "$f is not in $(basename "$SDIST")"
done
if grep -E "\.so$|/build/" "$WORK/sdist.txt"; then fail "build outputs in the sdist (above)"; fi

cat > "$WORK/check.py" <<'PY'
"""First use: import (builds or loads the extension), then one op on the cpu backend vs the reference."""
import sys
import torch
import rlhf_fast as rf
av = rf.available_backends()["cpu"]
assert av.startswith("ok (built on first use"), av
assert rf.__file__.startswith(sys.prefix), rf.__file__  # the installed package, not the source tree
g = torch.Generator().manual_seed(0)
logits = torch.randn(6, 37, generator=g, dtype=torch.float64)
labels = torch.randint(0, 37, (6,), generator=g)
labels[2] = -100
out = {}
for b in ("cpu", "reference"):
    x = logits.clone().requires_grad_()
    lp, ent = rf.logprobs(x, labels, return_entropy=True, backend=b)
    (lp.sum() + 0.5 * ent.sum()).backward()
    out[b] = (lp.detach(), ent.detach(), x.grad)
for a, r in zip(out["cpu"], out["reference"]):
    torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
print("ok:", av)
PY

step "venv A: $TORCH, then pip install $(basename "$SDIST")"
"$PY" -m venv "$WORK/a"
"$WORK/a/bin/pip" install -q "$TORCH"
"$WORK/a/bin/pip" install -v "$SDIST" > "$WORK/install_a.log" 2>&1 || { tail -50 "$WORK/install_a.log"; fail "pip install sdist failed"; }
no_warnings "$WORK/install_a.log"
step "venv A: two processes at once on an empty cache (first-use build, CPU only)"
(cd "$WORK" && a/bin/python check.py > r1.out 2> r1.err) & p1=$!
(cd "$WORK" && a/bin/python check.py > r2.out 2> r2.err) & p2=$!
wait $p1 || { cat "$WORK/r1.err"; fail "process 1 failed"; }
wait $p2 || { cat "$WORK/r2.err"; fail "process 2 failed"; }
cat "$WORK"/r1.err "$WORK"/r2.err "$WORK"/r1.out "$WORK"/r2.out
[ "$(cat "$WORK"/r1.err "$WORK"/r2.err | grep -c "compiling the C++")" = 1 ] || fail "expected one 'compiling' line from two processes"

step "venv B: pip install . (torch not installed first)"
"$PY" -m venv "$WORK/b"
echo "$TORCH" > "$WORK/pin.txt"
PIP_CONSTRAINT="$WORK/pin.txt" "$WORK/b/bin/pip" install -v "$ROOT" > "$WORK/install_b.log" 2>&1 || { tail -50 "$WORK/install_b.log"; fail "pip install . failed"; }
no_warnings "$WORK/install_b.log"
(cd "$WORK" && b/bin/python check.py 2> rb.err) || { cat "$WORK/rb.err"; fail "venv B check failed"; }
if grep "compiling" "$WORK/rb.err"; then fail "venv B rebuilt what venv A cached"; fi
step "install check passed"
