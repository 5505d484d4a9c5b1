#!/bin/bash
# The runs behind this folder (README.md), as two queues side by side, each run after another and
# niced (a shared machine): `run.sh mlx` and `run.sh coreai`. Planned as all 300 items everywhere;
# at the measured pace (load 10) the later runs were cut to the first 150 items, and float16 to
# the none bundle's first 20 (the `mlx2` and `coreai2` stages, started once q8 and int4 ended).
# 2026-12-03, on an idle machine: int8, palettize4 and the Core ML package over all 300 items
# (`full-coreml` and `full-coreai`, side by side), replacing their first-150 runs.
# Then: python -m openelm_mlx.benchmarks.eval_packages benchmarks/results/eval-demo-linux-cpu-2026-12-02
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
R=benchmarks/results/eval-demo-linux-cpu-2026-12-02
W=${EVAL_WORK:-/tmp/eval-demo}  # the exports (the analysis reads their weights back)
TASK=openelm_mlx/demo_model/tasks/demo_cloze.yaml
DEMO=openelm_mlx/demo_model
O="nice -n 10 .venv/bin/openelm"
mkdir -p "$W"

log() { echo "$(date -u +%FT%TZ) $1 | $(cut -d' ' -f1-3 /proc/loadavg)" >> "$R/runs.log"; }
run() {  # NAME MODEL BACKEND [more eval options]
  local name=$1 model=$2 backend=$3; shift 3
  log "start $name"
  $O eval tasks "$model" --backend "$backend" --tasks "$TASK" --out "$R/$name" --force "$@"
  log "end $name"
}
coreai() {  # COMPRESSION PRECISION: the bundle $W/coreai-COMPRESSION-f32 (or -f16)
  local out="$W/coreai-$1-${2/float/f}"
  [ -d "$out" ] || $O export-coreai "$DEMO" -o "$out" --compress "$1" --compute-precision "$2"
}

case $1 in
  mlx)
    run fp32 "$DEMO" mlx
    $O convert "$DEMO" -o "$W/q8" --bits 8
    run q8 "$W/q8" mlx
    ;;
  mlx2)
    $O convert "$DEMO" -o "$W/q4" --bits 4
    run q4 "$W/q4" mlx
    $O export-coreml "$DEMO" -o "$W/demo.mlpackage"
    run coreml-none-first150 "$W/demo.mlpackage" mil-reference --limit 150
    ;;
  coreai)
    for c in none int4; do coreai $c float32 && run "coreai-$c-float32" "$W/coreai-$c-f32" coreai; done
    ;;
  coreai2)
    coreai none float16  # float16 compute, as devices run it
    run coreai-none-float16-first20 "$W/coreai-none-f16" coreai --limit 20
    for c in int8 palettize4; do
      coreai $c float32 && run "coreai-$c-float32-first150" "$W/coreai-$c-f32" coreai --limit 150
    done
    ;;
  full-coreml)
    run coreml-none "$W/demo.mlpackage" mil-reference
    ;;
  full-coreai)
    for c in int8 palettize4; do run "coreai-$c-float32" "$W/coreai-$c-f32" coreai; done
    ;;
esac
