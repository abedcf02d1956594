#!/usr/bin/env bash
# Issue 14's GPU figures in one run (a1 + a2 about 4 minutes on an H100; every part has its own
# time limit and prints its table even when another part fails). Logs, JSON and tables land in $OUT.
#
#   (a) SO400M@384 (random weights from its config, fp16, batch 256) on 12,000 synthetic JPEGs:
#       (a1) the vision tower alone (channels-last and NCHW pixels) vs `saefe build` end to end
#       with loader threads, then with 14 loader processes; (a2) the Ray build's stage layout
#       (decode workers -> one model; under torch's DataLoader where Ray is not installed).
#   (b) faiss-gpu IVF-PQ build + search at 10M x 1152 when faiss sees a GPU; otherwise the exact
#       torch search baseline at 10M (benchmarks/bench_gpu.py --parts search).
#
# The e2e build needs faiss (any build) for its index: carry faiss-cpu as a wheel (18.8 MB):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d .whl faiss-cpu==1.15.1
# and run it with carry [".whl"]:  bash benchmarks/gpu_check.sh
# Not carriable under the 64 MiB limit: ray 2.60 (cp312 wheel 79 MB; (a2) then runs the same stage
# classes under torch's DataLoader) and faiss-gpu-cu12 1.14.1 (48 MB, but it needs the CUDA 12
# cuBLAS + runtime wheels, which the CUDA 13 image lacks; (b) then times exact torch search).
set -u
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
WORK=${WORK:-/tmp/gpu_check}
mkdir -p "$WORK"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SAEFE_HOME="$WORK/home" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
# knobs for a smoke test elsewhere (defaults = the real check): layers, JPEGs, search size, device
LAYERS=${LAYERS:-27} IMAGES=${IMAGES:-12000} SEARCH_N=${SEARCH_N:-10000000} DEVICE=${DEVICE:-cuda}
# which parts to run (a1 a2 b); leave out one already measured to save device time
PARTS=${PARTS:-"a1 a2 b"}
want() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
SUMMARY="$OUT/summary.md"
: > "$SUMMARY"

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  nproc; free -g | head -2
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" 2>&1
  $PY -c "import faiss; print('faiss', faiss.__version__, 'gpus', faiss.get_num_gpus())" 2>&1
  $PY -c "import ray; print('ray', ray.__version__)" 2>&1
} > "$OUT/env.txt"
cat "$OUT/env.txt"

# part NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, keep its table
part() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout -k 15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local msg="rc $rc in $((SECONDS - t0)) s"
  [ $rc -eq 124 ] && msg="$msg (stopped at its ${limit} s limit)"
  echo "== $name: $msg" | tee -a "$SUMMARY"
  grep '^|' "$OUT/$name.log" | tee -a "$SUMMARY"
  echo >> "$SUMMARY"
}

# (a1) vision tower alone + the single-process build end to end: loader threads, then 14 loader processes
want a1 && part a_model_and_build 330 $PY benchmarks/bench_gpu.py --parts model,e2e --images "$IMAGES" --batch 256 --e2e-processes 14 \
  --layers "$LAYERS" --device "$DEVICE" --out "$WORK" --json "$OUT/a_model_and_build.json"
# (a2) the Ray build's stage layout on the same checkpoint and JPEGs (15 decode workers -> GPU)
if ! want a2; then
  echo "== a_ray_layout: not asked for (PARTS=$PARTS)" | tee -a "$SUMMARY"
elif [ -d "$WORK/so400m-${LAYERS}l" ] && [ -d "$WORK/jpegs" ]; then
  part a_ray_layout 120 $PY benchmarks/bench_gpu_mapper.py --images "$WORK/jpegs" --model "$WORK/so400m-${LAYERS}l" \
    --device "$DEVICE" --batch 256 --shard 128 --json "$OUT/a_ray_layout.json"
else
  echo "== a_ray_layout: skipped (no checkpoint/JPEGs from a1)" | tee -a "$SUMMARY"
fi
# (b) faiss-gpu at 10M, or the exact torch baseline
if ! want b; then
  echo "== b: not asked for (PARTS=$PARTS)" | tee -a "$SUMMARY"
elif $PY -c "import faiss, sys; sys.exit(0 if faiss.get_num_gpus() > 0 else 1)" 2>/dev/null; then
  part b_faiss_gpu 200 $PY benchmarks/bench_faiss_gpu.py --n "$SEARCH_N" --json "$OUT/b_faiss_gpu.json"
else
  echo "faiss with GPUs is not importable here: exact torch search at 10M instead" | tee -a "$SUMMARY"
  part b_exact_search 120 $PY benchmarks/bench_gpu.py --parts search --search-n "$SEARCH_N" --layers "$LAYERS" --out "$WORK" \
    --json "$OUT/b_exact_search.json"
fi
echo; echo "==== summary ($SUMMARY)"; cat "$SUMMARY"
