#!/usr/bin/env bash
# MagicVideo's unsupervised pre-training in miniature (configs/shapes_unsupervised.py), with only 10%
# of the moving_shapes clips captioned, then the judge's scores of both video models:
#
#   bash launch/train_unsupervised.sh [RUNS_DIR]        (default RUNS_DIR=runs/shapes_unsupervised)
#
#   (0) clip       a CLIP-style dual encoder, contrastive on (frame, caption) pairs
#   (a) text_only  the video model on the 10% captioned clips, conditioned on CLIP text embeddings
#   (b) stage1     every clip, conditioned on the CLIP image embedding of a random frame
#       stage2     the 10% captioned clips, conditioned on CLIP text embeddings, from stage1
#   [WITH_TOKENS=1: (a') text_tokens, the 10% with the usual text-token conditioning]
#
# The video models start from the bundled checkpoint's VAE (magicvideo_jax/assets/shapes). Each run
# resumes from its workdir if interrupted; a finished run is skipped. Budgets: CLIP_STEPS (1500),
# STAGE1_STEPS (3000), STAGE2_STEPS (1500); text_only gets STAGE1_STEPS + STAGE2_STEPS. EXTRA_FLAGS
# are passed to every run (e.g. "--config.train.log_every=1"), EVAL_FLAGS to every scoring. The defaults
# took 6969 s with EXTRA_FLAGS="--num_cpu_devices=2" on 2 CPU cores (BENCHMARKS.md). A smoke
# test of the whole script (about 10 min):
#   CLIP_STEPS=3 STAGE1_STEPS=3 STAGE2_STEPS=3 EVAL_FLAGS="--num_prompts 4 --batch_size 4 --steps 2" \
#     bash launch/train_unsupervised.sh /tmp/unsupervised_smoke
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-runs/shapes_unsupervised}"
PYTHON="${PYTHON:-.venv/bin/python}"
CLIP_STEPS="${CLIP_STEPS:-1500}"
STAGE1_STEPS="${STAGE1_STEPS:-3000}"
STAGE2_STEPS="${STAGE2_STEPS:-1500}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"
EVAL_FLAGS="${EVAL_FLAGS:-}"
CLIP="$RUNS/clip/model"
start=$(date +%s)

source launch/stage.sh
run() {  # run NAME [extra main.py flags]
  local name="$1"; shift
  # shellcheck disable=SC2086
  train_stage "$name" "configs/shapes_unsupervised.py:$name" "$@" $EXTRA_FLAGS
}

run clip --config.train.num_steps="$CLIP_STEPS"
"$PYTHON" -m magicvideo_jax.eval.clip_zero_shot --checkpoint "$CLIP" --json "$RUNS/clip/zero_shot.json"
run text_only --config.model.conditioning.clip_dir="$CLIP" \
  --config.train.num_steps=$((STAGE1_STEPS + STAGE2_STEPS))
run stage1 --config.model.conditioning.clip_dir="$CLIP" --config.train.num_steps="$STAGE1_STEPS"
run stage2 --config.model.conditioning.clip_dir="$CLIP" --config.train.init_from="$RUNS/stage1/model" \
  --config.train.num_steps="$STAGE2_STEPS"
MODELS=(text_only stage2)
if [[ "${WITH_TOKENS:-0}" == 1 ]]; then
  run text_tokens --config.train.num_steps=$((STAGE1_STEPS + STAGE2_STEPS))
  MODELS+=(text_tokens)
fi
echo "== training finished in $(($(date +%s) - start)) s"

for name in "${MODELS[@]}"; do
  for split in test validation; do
    # shellcheck disable=SC2086
    "$PYTHON" -m magicvideo_jax.eval.shapes --checkpoint "$RUNS/$name/model" --split "$split" \
      --num_prompts 64 --json "$RUNS/$name/scores_$split.json" $EVAL_FLAGS
  done
done
echo "== total $(($(date +%s) - start)) s"
