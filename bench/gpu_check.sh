#!/usr/bin/env bash
# The GPU check: one script that fits one 600 s device call on one H100/H200 with 16 cores
# (start-up and installs included): tests first, then benchmarks while the time budget lasts.
#
#   bash bench/gpu_check.sh [RESULTS_FILE]
#   device tool: run(command="bash bench/gpu_check.sh", carry=["bench/wheels"], timeout_s=600)
#     after `bash bench/fetch_wheels.sh` here (bench/wheels/ is git-ignored, so it must be carried)
#
# Uses what the machine has. In an NGC PyTorch container (the Dockerfile's base) everything runs.
# On a bare CUDA machine with only PyTorch, the project runs from source (PYTHONPATH) with the
# small wheels of bench/wheels/ (megatron-core, omegaconf, hydra-core, antlr4 runtime; fetch them
# here with `bash bench/fetch_wheels.sh` and carry the folder), and what cannot be there is skipped
# with the reason: Transformer Engine (a 277 MB wheel plus an extension built against torch) and
# DALI (199 MB).
#
# Steps: the GPU-marked tests (bf16 training step with fusions and DDP overlaps, recompute,
# distributed optimizer save -> load -> reshard, TE vs local parity and DALI NVDEC decode where
# present), then the benchmarks (bench/bench_train.py: stage 2 on a 7B-width model with as many
# layers as fit, stage 1 on the full 7B with the LLM frozen, local spec and TE where present,
# FP8 on Hopper with TE; bench/bench_decode.py: DALI NVDEC vs CPU where DALI is present).
# Every result is one line in RESULTS_FILE (default: $OUT/gpu_check.txt if OUT is set, else
# bench/gpu_check_results.txt); `skip ...` lines say what did not run and why.

set -u
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
RESULTS=${1:-${OUT:+$OUT/gpu_check.txt}}
RESULTS=${RESULTS:-$REPO/bench/gpu_check_results.txt}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}   # stop starting new steps after this; every step ends by BUDGET_S + 60 (< 600 s)
TEST_S=${GPU_CHECK_TEST_S:-200}       # the GPU tests, all together
START=$(date +%s)
PY=${PYTHON:-python3}
: > "$RESULTS"

log() { echo "$*" | tee -a "$RESULTS"; }
elapsed() { echo $(( $(date +%s) - START )); }
time_left() { [ "$(elapsed)" -lt "$BUDGET_S" ]; }
has() { "$PY" -c "import $1" >/dev/null 2>&1; }

log "gpu_check start=$(date -u +%Y-%m-%dT%H:%M:%SZ) host=$(hostname)"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "skip all: no CUDA device visible to $PY (torch.cuda.is_available() is False)"
    exit 1
fi

# --- the project's pure-Python pieces, from wheels when the machine lacks them ------------------
SITE=/tmp/avllm_site
missing=()
for mod in omegaconf hydra; do has "$mod" || missing+=("$mod"); done
# megatron-core: the project needs 0.19.x (an NGC container may ship another)
"$PY" -c "import megatron.core as m, sys; sys.exit(0 if m.__version__.startswith('0.19.') else 1)" >/dev/null 2>&1 \
    || missing+=("megatron.core==0.19")
if [ ${#missing[@]} -gt 0 ]; then
    if ! ls "$REPO"/bench/wheels/*.whl >/dev/null 2>&1; then
        log "skip all: missing ${missing[*]} and no wheels in bench/wheels (run bench/fetch_wheels.sh and carry that folder)"
        exit 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$REPO"/bench/wheels/*.whl || { log "skip all: installing bench/wheels failed"; exit 1; }
    log "installed from bench/wheels: $(find "$REPO/bench/wheels" -name '*.whl' -printf '%f ')"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}:$SITE"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

"$PY" - <<'EOF' | tee -a "$RESULTS"
import torch, megatron.core as mc
p = torch.cuda.get_device_properties(0)
print(f"env device={torch.cuda.get_device_name(0).replace(' ', '_')} mem_gib={p.total_memory / 2**30:.0f} "
      f"cc={p.major}.{p.minor} torch={torch.__version__} cuda={torch.version.cuda} megatron_core={mc.__version__}")
EOF

TE=0; DALI=0; FP8=0
if has transformer_engine.pytorch; then TE=1; else log "skip te: Transformer Engine is not installed (TE tests and TE benchmarks)"; fi
if has nvidia.dali && has av; then DALI=1; else log "skip dali: nvidia-dali or PyAV is not installed (NVDEC test and decode benchmark)"; fi
CC=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
if [ "$TE" = 1 ] && [ "$CC" -ge 89 ]; then FP8=1; else log "skip fp8: needs Transformer Engine and compute capability >= 8.9 (have TE=$TE, cc=$CC)"; fi
MEM_GIB=$("$PY" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory // 2**30)")

# --- GPU-marked tests ------------------------------------------------------------------------
tests=(tests/gpu)
if [ "$DALI" = 1 ]; then tests+=(tests/data/test_dali.py); fi
# -ra: every test that did not pass is named in the summary (failures included), one line each;
# -o timeout: no single test may eat the device call
timeout "$TEST_S" "$PY" -m pytest -q -m gpu -ra -o timeout=150 -p no:cacheprovider "${tests[@]}" > /tmp/gpu_check_pytest.log 2>&1
rc=$?
[ $rc -eq 124 ] && log "test timeout: the GPU tests ran past ${TEST_S}s"
grep -E "passed|failed|error|skipped" /tmp/gpu_check_pytest.log | tail -n 1 | sed "s/^/test summary rc=$rc: /" | tee -a "$RESULTS"
grep -E "^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)" /tmp/gpu_check_pytest.log | sed 's/^/test /' | tee -a "$RESULTS"
if [ $rc -ne 0 ]; then tail -n 60 /tmp/gpu_check_pytest.log; fi
if [ -n "${OUT:-}" ]; then cp /tmp/gpu_check_pytest.log "$OUT/gpu_check_pytest.log"; fi

# --- benchmarks ------------------------------------------------------------------------------
# stage 2 trains all weights: bf16 + fp32 grads + distributed-optimizer state ~ 18 bytes/param
# (7B-width layer ~ 202M params ~ 3.6 GB) -> 16 layers on a 141 GB card, 8 on 80 GB
if [ "$MEM_GIB" -ge 120 ]; then S2_LAYERS=16; else S2_LAYERS=8; fi
bench() {  # bench NAME ARGS...: one bench_train run, its line in RESULTS
    local name=$1; shift
    if ! time_left; then log "skip bench $name: time budget (${BUDGET_S}s) spent"; return; fi
    local out left=$(( BUDGET_S + 60 - $(elapsed) ))
    [ "$left" -gt 150 ] && left=150
    out=$(timeout "$left" "$PY" bench/bench_train.py --out "$RESULTS" "$@" 2>/tmp/gpu_check_bench.err)
    local rc=$?
    if [ $rc -ne 0 ]; then
        log "bench $name failed rc=$rc: $(grep -E 'Error|error' /tmp/gpu_check_bench.err | tail -n 1)"
        tail -n 30 /tmp/gpu_check_bench.err
    else
        echo "$out"
    fi
}
S2=(--model vicuna7b --stage 2 --num-layers "$S2_LAYERS" --seq-length 2048 --micro-batch 2 --global-batch 8 --steps 4 --warmup 2)
S1=(--model vicuna7b --stage 1 --seq-length 1024 --micro-batch 2 --global-batch 8 --steps 4 --warmup 2)
# MAT-mixed micro-batches (V-only, A-only, AV, mixed; the last one changes every step): with the
# GPU defaults (overlapped grad reduce, distributed optimizer) a projector left out of a
# micro-batch's backward would stop the run here
if [ "$TE" = 1 ]; then
    bench stage2-te "${S2[@]}" --impl transformer_engine --mix mat
    [ "$FP8" = 1 ] && bench stage2-te-fp8 "${S2[@]}" --impl transformer_engine --fp8 hybrid --mix mat
    bench stage1-te "${S1[@]}" --impl transformer_engine --mix mat
fi
bench stage2-local "${S2[@]}" --impl local --mix mat
# packed vs padded at 7B width on the stage's real length mix (tokens/s and MFU on useful tokens)
if [ "$TE" = 1 ]; then
    bench stage2-te-padded "${S2[@]}" --impl transformer_engine --global-batch 16 --packing off
    bench stage2-te-packed "${S2[@]}" --impl transformer_engine --global-batch 16 --packing on
fi
bench stage2-local-padded "${S2[@]}" --impl local --global-batch 16 --packing off
bench stage2-local-packed "${S2[@]}" --impl local --global-batch 16 --packing on
bench stage1-local "${S1[@]}" --impl local --mix mat

if [ "$DALI" = 1 ]; then
    if time_left; then
        timeout 120 "$PY" bench/bench_decode.py --clips 4 --repeat 2 2>/tmp/gpu_check_decode.err | grep '^decode' | tee -a "$RESULTS" \
            || log "bench decode failed: $(tail -n 1 /tmp/gpu_check_decode.err)"
    else
        log "skip bench decode: time budget (${BUDGET_S}s) spent"
    fi
fi
log "gpu_check end elapsed_s=$(elapsed) results=$RESULTS"
