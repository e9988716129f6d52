#!/usr/bin/env bash
# The whole benchmark on a GPU machine (the H200 image: torch, transformers, einops; no deepspeed,
# webdataset or diffusers, no network). JSON lines land in $OUT (default ./bench_out).
#
# Here, once, with the project's venv (fills ./.whl, ignored by git; ~12 MB):
#   PATH=$PWD/.venv/bin:$PATH bash ../shared/gpu/wheels.sh diffusers importlib_metadata
# There, from the repository root, with .whl carried:
#   bash tools/bench_gpu.sh [PHASE ...]
# PHASE: smoke | train | sample | maxbatch | plan | compile | vae | rest | data | all
#        (default: all = smoke train sample maxbatch plan compile vae rest data, most telling first).
#   smoke    tiny preset, --quick: catches a broken environment in ~1 minute
#   train    SD2 (32x32x4 latents, 77x1024 context): peak, FLOPs, training step, variants
#            base, channels_last; ours vs diffusers (same DeepSpeed ZeRO-2 bf16 engine), batch 64
#   sample   SD2 DDIM 50 steps, CFG batched, batch 32: variants base, channels_last
#   maxbatch SD2 largest micro batch in the H200's memory: training (base, ckpt) and sampling,
#            ours and diffusers (4-7 probes each, 3% resolution)
#   plan     the planner's point for this GPU (issue 18): tools.plan for MAIN on one GPU of
#            BENCH_PLAN_CLUSTER (h200x8) at micro batch 64, activations probed on the device
#            ($OUT/plan.json: memory, largest micro batch with/without checkpointing, step time),
#            and the MFU of every preset the train records hold ($OUT/plan_table.json, --calibrate)
#   compile  SD2 train with channels_last+compile, sample with channels_last+compile and
#            channels_last+cudagraphs (torch.compile mode reduce-overhead), ours vs diffusers
#   vae      SD2 with SD's VAE shapes (random weights): encode images/s at 256 px, training step from
#            precomputed latents vs encoding on the fly, ours vs diffusers
#   rest     base64 and tiny presets, train + sample, variants base, channels_last
#   data     tools.bench_data through tools.bench (JPEG shards vs bare decode)
# Knobs (environment): BENCH_DEVICE (cuda), BENCH_BUDGET (540), BENCH_MAIN (sd2), BENCH_REST
# (base64,tiny), BENCH_VARIANTS (base,channels_last), BENCH_COMPILE_TRAIN (channels_last+compile),
# BENCH_COMPILE_SAMPLE (channels_last+compile,channels_last+cudagraphs), BENCH_MAXBATCH_VARIANTS
# (base,ckpt), BENCH_REST_VARIANTS (base,channels_last), BENCH_PLAN_CLUSTER (h200x8), BENCH_ARGS
# (extra arguments for every tools.bench call).
# BENCH_NO_WHEELS=1 (use the installed packages), PYTHON (python3). Dry run on a CPU box:
#   BENCH_NO_WHEELS=1 PYTHON=.venv/bin/python BENCH_DEVICE=cpu BENCH_MAIN=tiny BENCH_REST= \
#   BENCH_VARIANTS=base BENCH_ARGS="--threads 1 --batch 2 --steps 1 --sample-batch 1 --sample-steps 2" \
#   OUT=/tmp/bench_dry bash tools/bench_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench_out}
mkdir -p "$OUT"
DEV=${BENCH_DEVICE:-cuda}
BUDGET=${BENCH_BUDGET:-540}
MAIN=${BENCH_MAIN:-sd2}
REST=${BENCH_REST-base64,tiny}
VARIANTS=${BENCH_VARIANTS:-base,channels_last}
COMPILE_TRAIN=${BENCH_COMPILE_TRAIN:-channels_last+compile}
COMPILE_SAMPLE=${BENCH_COMPILE_SAMPLE:-channels_last+compile,channels_last+cudagraphs}
MAXBATCH_VARIANTS=${BENCH_MAXBATCH_VARIANTS:-base,ckpt}
PLAN_CLUSTER=${BENCH_PLAN_CLUSTER:-h200x8}
REST_VARIANTS=${BENCH_REST_VARIANTS:-base,channels_last}
read -r -a EXTRA <<< "${BENCH_ARGS:-}"
PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(all)
[ "${PHASES[0]}" = all ] && PHASES=(smoke train sample maxbatch plan compile vae rest data)

# carried wheels (deepspeed, webdataset, diffusers, ...) into /tmp/site
if [ -z "${BENCH_NO_WHEELS:-}" ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PYTHON:-python3}
export DS_ACCELERATOR=$DEV HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

{ command -v nvidia-smi >/dev/null && nvidia-smi; uptime; nproc
  $PY -c "import torch, deepspeed, webdataset; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'deepspeed', deepspeed.__version__)
try:
    import diffusers; print('diffusers', diffusers.__version__)
except Exception as e:
    print('diffusers missing:', e)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

START=$SECONDS
left() { echo $(( BUDGET - (SECONDS - START) )); }
bench() {   # bench LABEL ARGS... : one tools.bench call under what is left of the budget
  local label=$1; shift
  local t; t=$(left)
  if [ "$t" -le 0 ]; then echo "{\"bench\": \"skipped\", \"what\": \"$label\", \"reason\": \"BENCH_BUDGET spent\"}" >> "$OUT/bench.jsonl"; return; fi
  echo "== $label ($t s left)" >&2
  $PY -m tools.bench --device "$DEV" --time-budget "$t" --out "$OUT/bench.jsonl" "$@" "${EXTRA[@]}" \
    2>> "$OUT/bench.log" | cut -c1-400
  echo "== $label: exit ${PIPESTATUS[0]} after $((SECONDS - START)) s" >&2
}

for phase in "${PHASES[@]}"; do
  case $phase in
    smoke)  bench smoke --presets tiny --quick --steps 2 --sections train,sample ;;
    train)  bench train --presets "$MAIN" --sections peak,flops,train --variants "$VARIANTS" ;;
    sample) bench sample --presets "$MAIN" --sections sample --variants "$VARIANTS" ;;
    maxbatch) bench maxbatch --presets "$MAIN" --sections maxbatch --maxbatch-variants "$MAXBATCH_VARIANTS" ;;
    plan)
      echo "== plan ($PLAN_CLUSTER)" >&2
      probe=device; [ "$DEV" = cuda ] || probe=auto
      timeout "$(( $(left) > 0 ? $(left) : 1 ))" $PY -m tools.plan --preset "$MAIN" --cluster "$PLAN_CLUSTER" --nodes 1 \
        --gpus-per-node 1 --micro-batch 64 --probe "$probe" --json > "$OUT/plan.json" 2> "$OUT/plan.txt"
      echo "== plan: exit $? after $((SECONDS - START)) s" >&2
      if grep -q '"bench": "train"' "$OUT/bench.jsonl" 2>/dev/null; then
        $PY -m tools.plan --cluster "$PLAN_CLUSTER" --calibrate "$OUT/bench.jsonl" --table "$OUT/plan_table.json" \
          2>> "$OUT/plan.txt" >/dev/null
      fi
      tail -n 30 "$OUT/plan.txt" >&2 ;;
    compile)
      bench compile-train --presets "$MAIN" --sections train --variants "$COMPILE_TRAIN"
      bench compile-sample --presets "$MAIN" --sections sample --variants "$COMPILE_SAMPLE" ;;
    vae)    bench vae --presets "$MAIN" --sections vae ;;
    rest)   [ -n "$REST" ] && bench rest --presets "$REST" --sections flops,train,sample --variants "$REST_VARIANTS" ;;
    data)   bench data --sections data ;;
    *) echo "unknown phase $phase (smoke|train|sample|maxbatch|plan|compile|vae|rest|data|all)" >&2; exit 2 ;;
  esac
done
echo "done in $((SECONDS - START)) s; results: $OUT/bench.jsonl" >&2
