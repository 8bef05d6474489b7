#!/usr/bin/env bash
# GPU validation in one call (~8 minutes by default, no network): build the CUDA extension, run the whole
# test suite on the GPU (the static profile of the same commit compiles beside it, on the CPU), run the
# benchmark matrix at the issue's sizes, linear_ppo_loss against three cuBLAS GEMMs, TRL's GRPO step
# patched vs unpatched and the PPO trainer, and write results, a log and the device info under $OUT
# (if set; at most 8 files) and benchmarks/results/<device>/.
#
#   bash benchmarks/gpu_run.sh             on the GPU machine (torch, triton, nvcc, ninja preinstalled)
#   bash benchmarks/gpu_run.sh --dry-run   the same steps on the CPU at tiny sizes (checks this script)
#
# Every part has a time budget and the script goes on past failures; what was measured is always
# written. The parts run in the order of what matters most if time runs out: build, tests (static
# profile beside them), benchmark matrix, linear_ppo_loss, torch.compile pass, TRL step, DDP/FSDP memory
# (benchmarks/distributed_memory.py over the node's GPUs), PPO trainer;
# a part that would not get its minimum is skipped and logged as such.
# Optional: a .whl/ folder of wheels (pytest, matplotlib, trl, ...) installed first, offline.
# Knobs (environment): GPU_RUN_TOTAL_S (default 480), GPU_RUN_BUILD_S (240), GPU_RUN_TESTS_S (180),
# GPU_RUN_STATIC_S (150), GPU_RUN_LINPPO_S (60), GPU_RUN_TRL_S (120),
# GPU_RUN_SKIP=build,static,tests,bench,linppo,compile,trl,dist,trainer,plots
# GPU_RUN_BENCH_ARGS (extra args for python -m benchmarks), GPU_RUN_LINPPO_ARGS (for bench_linear_ppo_loss),
# GPU_RUN_TRL_ARGS (for trl_grpo_step), GPU_RUN_RESULTS (results folder), PYTHON (interpreter),
# RLHF_FAST_GIT_COMMIT (recorded in results).
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python}
TOTAL_S=${GPU_RUN_TOTAL_S:-480}
BUILD_S=${GPU_RUN_BUILD_S:-240}
TESTS_S=${GPU_RUN_TESTS_S:-180}
STATIC_S=${GPU_RUN_STATIC_S:-150}
LINPPO_S=${GPU_RUN_LINPPO_S:-60}
TRL_S=${GPU_RUN_TRL_S:-120}
SKIP=",${GPU_RUN_SKIP:-},"
START=$(date +%s)
WORK=$(mktemp -d)
LOG=$WORK/gpu_run.log
FAILED=""
# the order matters: if time runs out, the issue's headline cases are already measured
OPS=logprobs,ppo_loss_from_logits,gae,ppo_policy_loss,linear_logprobs,kl,ppo_value_loss,grpo_advantages,rloo_advantages

log() { echo "[gpu_run +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
# seconds for a part: what it asks for, capped by the time left minus a reserve for the later parts
budget() { local b=$1 l; l=$(( $(left) - ${2:-20} )); [ "$l" -lt "$b" ] && b=$l; [ "$b" -lt 1 ] && b=1; echo "$b"; }
skipped() { case "$SKIP" in *",$1,"*) return 0 ;; esac; return 1; }
has_module() { "$PY" -c "import $1" >/dev/null 2>&1; }
# the seconds that part $1 asks for, or 0 where it is skipped (the reserve earlier parts leave for it)
wants() { if skipped "$1"; then echo 0; else echo "$2"; fi; }
COMMIT=${RLHF_FAST_GIT_COMMIT:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)}
# run "$@" with a time limit, its output appended to the log and to file $1
limited() {
  local secs=$1 out=$2; shift 2
  if command -v timeout >/dev/null 2>&1; then
    timeout -k 20 "$secs" "$@" >>"$out" 2>&1
  else
    "$@" >>"$out" 2>&1
  fi
}

log "rlhf_fast GPU run (dry-run=$DRY) in $ROOT, total budget ${TOTAL_S}s"
[ "$DRY" = 1 ] && DEVICE=cpu || DEVICE=cuda
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  log "torch sees no CUDA device: nothing to validate here (use --dry-run on a CPU machine)"
  FAILED="$FAILED no-gpu"
fi

# ---------------------------------------------------------------- device info
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -a)"
  echo "git commit: $COMMIT"
  command -v nvidia-smi >/dev/null && nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  command -v nvcc >/dev/null && nvcc --version 2>&1 | tail -2 || echo "nvcc: not found"
  "$PY" - <<'PY' 2>&1
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| torch CUDA", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as e: print("triton: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
for m in ("pytest", "matplotlib", "safetensors", "liger_kernel", "flash_attn", "trl", "transformers", "datasets",
          "ninja", "pybind11"):
    try:
        mod = __import__(m); print(f"{m}: {getattr(mod, '__version__', 'ok')}")
    except Exception as e: print(f"{m}: MISSING ({type(e).__name__})")
PY
} >"$WORK/device.txt" 2>&1
cat "$WORK/device.txt" >>"$LOG"

# ---------------------------------------------------------------- optional offline wheels
if ls .whl/*.whl >/dev/null 2>&1; then
  if [ "$DRY" = 1 ]; then
    log "wheels: would install $(ls .whl/*.whl | tr '\n' ' ')(not in a dry run)"
  else
    log "wheels: pip install --no-index --no-deps .whl/*.whl"
    limited 120 "$LOG" "$PY" -m pip install --no-index --no-deps .whl/*.whl || { log "wheels: FAILED (going on)"; FAILED="$FAILED wheels"; }
  fi
fi

# ---------------------------------------------------------------- build
if skipped build; then
  log "build: skipped (GPU_RUN_SKIP)"
else
  B=$(budget "$BUILD_S" 200)
  if [ "$DRY" = 1 ]; then
    # a dry run must not touch the installed packages: build in place, CPU sources only
    log "build: RLHF_FAST_CUDA=0 setup.py build_ext --inplace (limit ${B}s)"
    RLHF_FAST_CUDA=0 limited "$B" "$LOG" "$PY" setup.py build_ext --inplace && log "build: ok" \
      || { log "build: FAILED (going on with what imports)"; FAILED="$FAILED build"; }
  else
    log "build: RLHF_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation --no-deps -e . (limit ${B}s)"
    export RLHF_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    if limited "$B" "$LOG" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .; then
      log "build: ok"
    else
      log "build: pip install failed; trying setup.py build_ext --inplace"
      limited "$(budget "$BUILD_S" 200)" "$LOG" "$PY" setup.py build_ext --inplace && log "build: ok (in place)" \
        || { log "build: FAILED (going on: tests and benchmarks use the backends that load)"; FAILED="$FAILED build"; }
    fi
  fi
fi
SLUG=unknown
BACKENDS=$("$PY" -c "import rlhf_fast as rf; from benchmarks.harness import device_slug
print(device_slug('$DEVICE')); print('backends:', rf.available_backends())" 2>&1)
echo "$BACKENDS" | tail -n +2 | tee -a "$LOG" >>"$WORK/device.txt"
case "$BACKENDS" in *"backends:"*) SLUG=$(echo "$BACKENDS" | head -1) ;; esac

# ---------------------------------------------------------------- benchmark settings
if [ "$DRY" = 1 ]; then
  RES=${GPU_RUN_RESULTS:-$WORK/results}
else
  RES=${GPU_RUN_RESULTS:-$ROOT/benchmarks/results/$SLUG}
fi
mkdir -p "$RES"

# ---------------------------------------------------------------- static profile (CPU only: beside the tests)
# the compiler's view of the kernels of this commit (registers, spills, hot-loop loads, SASS/element),
# to read beside the measured numbers; its own caches, so it never races the test suite's copy of it
STATIC_PID=""
if skipped static; then
  log "static: skipped (GPU_RUN_SKIP)"
elif [ ! -f "$ROOT/benchmarks/static_profile.py" ]; then
  log "static: skipped: benchmarks/static_profile.py is not in this tree"
else
  ARCH=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(10 * c[0] + c[1])" 2>/dev/null)
  case "$ARCH" in 80|90|100) ;; *) ARCH=90 ;; esac
  CORES=$(nproc 2>/dev/null || echo 2)
  STATIC_CMD=(env -u TRITON_INTERPRET RLHF_FAST_STATIC_CACHE="$WORK/static_cache" TRITON_CACHE_DIR="$WORK/static_triton"
              "$PY" -m benchmarks.static_profile --arch "$ARCH" --jobs $(( CORES > 3 ? CORES / 2 : 1 )) --out "$RES/static")
  if [ "$DRY" = 1 ]; then
    # minutes of compiling on a small CPU: a dry run checks that the module loads and parses its arguments
    if limited 60 "$LOG" "$PY" -m benchmarks.static_profile --help; then
      log "static: dry run: benchmarks.static_profile loads; would run: ${STATIC_CMD[*]}"
    else
      log "static: FAILED: python -m benchmarks.static_profile --help"; FAILED="$FAILED static"
    fi
  else
    S=$(budget "$STATIC_S" 60)
    log "static: ${STATIC_CMD[*]} in the background (limit ${S}s; log in static.log)"
    mkdir -p "$RES/static" && echo "$COMMIT" >"$RES/static/commit.txt"
    limited "$S" "$WORK/static.log" "${STATIC_CMD[@]}" &
    STATIC_PID=$!
  fi
fi

# ---------------------------------------------------------------- tests
: >"$WORK/tests.log"
if skipped tests; then
  log "tests: skipped (GPU_RUN_SKIP)"
elif ! has_module pytest; then
  log "tests: skipped: pytest is MISSING (put its wheel in .whl/)"
  FAILED="$FAILED tests"
else
  T=$(budget "$TESTS_S" 150)
  # the benchmark-harness test runs the CPU benchmarks: the real ones run below
  if [ "$DRY" = 1 ]; then
    log "tests: pytest tests/test_backend.py (dry run: one file; limit ${T}s)"
    limited "$T" "$WORK/tests.log" "$PY" -m pytest tests/test_backend.py -q -p no:cacheprovider
  else
    log "tests: RLHF_FAST_TEST_GPU=1 pytest tests (limit ${T}s)"
    RLHF_FAST_TEST_GPU=1 limited "$T" "$WORK/tests.log" "$PY" -m pytest tests -q -rfEs -p no:cacheprovider \
      --ignore=tests/test_benchmarks.py
  fi
  rc=$?
  tail -n 30 "$WORK/tests.log" >>"$LOG"
  if [ $rc = 0 ]; then log "tests: ok"; else log "tests: FAILED or timed out (rc=$rc; see tests.log)"; FAILED="$FAILED tests"; fi
fi

# the benchmarks below time the GPU: the static profile must be done compiling first
if [ -n "$STATIC_PID" ]; then
  wait "$STATIC_PID"; rc=$?
  tail -n 20 "$WORK/static.log" >>"$LOG"
  if [ $rc = 0 ]; then log "static: ok ($RES/static)"; else log "static: FAILED or timed out (rc=$rc)"; FAILED="$FAILED static"; fi
fi

# ---------------------------------------------------------------- benchmarks
if [ "$DRY" = 1 ]; then
  BENCH_ARGS="--device cpu --sizes tiny --threads 1 --budget 0.05"
  LINPPO_ARGS="--device cpu --N 96 --H 32 --V 1000 --reps 1 --gemm-baseline --chunk-sizes default,64"
  TRL_ARGS="--device cpu --vocab 512 --batch 1 --seq 16 --reps 1 --kinds step"  # the trainer: tests/test_integrations_trl.py
else
  BENCH_ARGS="--device cuda --sizes gpu --budget 0.4 --max-reps 50"
  LINPPO_ARGS="--device cuda"  # N=16384 H=4096 V=151936 bf16, chunk sizes default,1024,2048, the 3 GEMMs
  TRL_ARGS="--device cuda --vocab 151936 --batch 8 --seq 1024 --reps 3 --kinds step,trainer"
fi
LINPPO_ARGS="$LINPPO_ARGS ${GPU_RUN_LINPPO_ARGS:-}"
TRL_ARGS="$TRL_ARGS ${GPU_RUN_TRL_ARGS:-}"
BENCH_ARGS="$BENCH_ARGS --ops $OPS ${GPU_RUN_BENCH_ARGS:-}"
NOPLOT=""
if skipped plots; then
  NOPLOT="--no-plots"
elif ! has_module matplotlib; then
  NOPLOT="--no-plots"; log "bench: matplotlib is MISSING: no plots (put its wheel in .whl/)"
fi
if skipped bench; then
  log "bench: skipped (GPU_RUN_SKIP)"
else
  # pass 1: rlhf_fast backends and the installed peers; pass 2 (time permitting): torch.compile,
  # whose compile time would otherwise eat the budget of the headline cases
  B=$(budget $(( $(left) * 3 / 4 )) $(( 15 + $(wants linppo "$LINPPO_S") )))
  log "bench: pass 1 into $RES (limit ${B}s)"
  # shellcheck disable=SC2086
  limited "$B" "$LOG" "$PY" -m benchmarks $BENCH_ARGS --peers python-loop,trl,liger,flash-attn \
    --time-budget $(( B - 30 > 10 ? B - 30 : 10 )) --out "$RES" --no-plots \
    || { log "bench: pass 1 FAILED or cut short (what it measured is kept)"; FAILED="$FAILED bench"; }
fi

# ---------------------------------------------------------------- linear_ppo_loss vs three cuBLAS GEMMs
if skipped linppo; then
  log "linppo: skipped (GPU_RUN_SKIP)"
elif [ "$(left)" -lt 30 ]; then
  log "linppo: skipped: only $(left)s left"
else
  B=$(budget "$LINPPO_S" 10)
  log "linppo: python -m benchmarks.bench_linear_ppo_loss $LINPPO_ARGS (limit ${B}s)"
  # shellcheck disable=SC2086
  limited "$B" "$LOG" "$PY" -m benchmarks.bench_linear_ppo_loss $LINPPO_ARGS --out "$RES" $NOPLOT \
    && log "linppo: ok ($RES/linear_ppo_loss.json)" || { log "linppo: FAILED or cut short"; FAILED="$FAILED linppo"; }
fi

# ---------------------------------------------------------------- benchmarks, pass 2: torch.compile
if skipped bench; then
  :
elif skipped compile; then
  log "bench: torch.compile pass skipped (GPU_RUN_SKIP)"
elif [ "$(left)" -lt 60 ]; then
  log "bench: torch.compile pass skipped: only $(left)s left"
else
  B=$(budget "$(left)" $(( 15 + $(wants trl 60) + $(wants trainer 60) )))  # keeps time for the TRL step and trainer
  log "bench: pass 2 (torch.compile vs reference, limit ${B}s)"
  # shellcheck disable=SC2086
  limited "$B" "$LOG" "$PY" -m benchmarks $BENCH_ARGS --backends reference --peers torch.compile \
    --time-budget $(( B - 30 > 10 ? B - 30 : 10 )) --out "$RES" --append --no-plots \
    || { log "bench: pass 2 FAILED or cut short"; FAILED="$FAILED compile"; }
fi
if ! skipped bench; then
  if [ -f "$RES/results.json" ]; then
    limited 60 "$LOG" "$PY" -m benchmarks --replot "$RES" $NOPLOT || log "bench: replot FAILED"
    cat "$RES/results.md" >>"$LOG"
  else
    log "bench: no results.json written"
  fi
fi

# ---------------------------------------------------------------- TRL GRPO step, patched vs unpatched
if skipped trl; then
  log "trl: skipped (GPU_RUN_SKIP)"
elif ! has_module trl; then
  log "trl: skipped: trl is MISSING (put its wheels in .whl/)"
elif [ "$(left)" -lt 45 ]; then
  log "trl: skipped: only $(left)s left"
else
  B=$(budget "$TRL_S" $(( 15 + $(wants trainer 45) )))
  log "trl: python -m benchmarks.trl_grpo_step $TRL_ARGS (limit ${B}s)"
  # shellcheck disable=SC2086
  limited "$B" "$LOG" "$PY" -m benchmarks.trl_grpo_step $TRL_ARGS --timeout $(( B / 3 )) --out "$RES" \
    && log "trl: ok ($RES/trl_grpo_step.json)" || { log "trl: FAILED or cut short"; FAILED="$FAILED trl"; }
fi

# ---------------------------------------------------------------- per-rank memory: DDP vs FSDP over this node's GPUs
if skipped dist || [ "$DRY" = 1 ]; then
  log "dist: skipped (GPU_RUN_SKIP or dry run; on a CPU: python -m benchmarks.distributed_memory)"
elif [ "$(left)" -lt 60 ]; then
  log "dist: skipped: only $(left)s left"
else
  NG=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  WORLDS=$(for w in 1 2 4 8; do [ "$w" -le "${NG:-0}" ] && printf '%s,' "$w"; done); WORLDS=${WORLDS%,}
  B=$(budget 90 $(( 15 + $(wants trainer 45) )))
  log "dist: python -m benchmarks.distributed_memory --device cuda --worlds ${WORLDS:-1} (limit ${B}s)"
  limited "$B" "$LOG" "$PY" -m benchmarks.distributed_memory --device cuda --worlds "${WORLDS:-1}" --d-model 1024 \
    --n-layer 8 --n-head 16 --batch 8 --timeout "$B" --out "$RES" \
    && cat "$RES/distributed_memory.md" >>"$LOG" || { log "dist: FAILED or cut short"; FAILED="$FAILED dist"; }
fi

# ---------------------------------------------------------------- PPO trainer: rf ops vs reference ops
if skipped trainer || [ "$DRY" = 1 ]; then
  log "trainer: skipped (GPU_RUN_SKIP or dry run)"
elif [ "$(left)" -lt 60 ]; then
  log "trainer: skipped: only $(left)s left"
else
  B=$(budget "$(left)" 15)
  log "trainer: python -m benchmarks.ppo_trainer (limit ${B}s)"
  limited "$B" "$LOG" "$PY" -m benchmarks.ppo_trainer --device "$DEVICE" --out "$RES" \
    && cat "$RES/ppo_trainer.md" >>"$LOG" || { log "trainer: FAILED or cut short"; FAILED="$FAILED trainer"; }
fi

# ---------------------------------------------------------------- collect
log "done in $(( $(date +%s) - START ))s; failed parts:${FAILED:- none}"
cp "$LOG" "$WORK/device.txt" "$WORK/tests.log" "$RES/" 2>/dev/null
[ -f "$WORK/static.log" ] && cp "$WORK/static.log" "$RES/static/"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  # at most 8 files: log, device info, test log, results (json, md, summary plot) and a tarball of all
  cp "$LOG" "$WORK/device.txt" "$OUT/"
  [ -s "$WORK/tests.log" ] && cp "$WORK/tests.log" "$OUT/"
  for f in results.json results.md summary.png; do [ -f "$RES/$f" ] && cp "$RES/$f" "$OUT/"; done
  tar -czf "$OUT/results.tgz" -C "$(dirname "$RES")" "$(basename "$RES")" 2>/dev/null
fi
rm -rf "$WORK"
[ -z "$FAILED" ]
