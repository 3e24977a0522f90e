#!/usr/bin/env bash
# The cascade in miniature (configs/shapes_cascade.py) after the shapes base recipe: trains the keyframe
# interpolation stage (16 -> 46 frames) and the super-resolution stage (32 -> 64 px) from a base shapes
# model, assembles a cascade folder and judges the cascaded video.
#
#   bash launch/train_cascade.sh [RUNS_DIR]        (default RUNS_DIR=runs/shapes_cascade)
#
# BASE: the base model folder (default magicvideo_jax/assets/shapes, the bundled checkpoint;
#       e.g. BASE=runs/shapes/video/model). WITH_BASE=1 first runs launch/train_shapes.sh (the base
#       recipe, which also refreshes the bundled checkpoint) and uses its video stage.
# STEPS: optional --config.train.num_steps for both stages (default: the config's 1500).
# NUM_PROMPTS: prompts of the final evaluation (default 64).
# Each stage resumes from its workdir if interrupted; a finished stage is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-runs/shapes_cascade}"
PYTHON="${PYTHON:-.venv/bin/python}"
if [[ "${WITH_BASE:-0}" == 1 ]]; then
  bash launch/train_shapes.sh
  BASE="${BASE:-runs/shapes/video/model}"
fi
BASE="${BASE:-magicvideo_jax/assets/shapes}"
[[ -f "$BASE/config.json" ]] || { echo "base model folder $BASE not found (WITH_BASE=1 trains it)" >&2; exit 1; }
EXTRA=()
[[ -n "${STEPS:-}" ]] && EXTRA+=("--config.train.num_steps=$STEPS")
start=$(date +%s)

source launch/stage.sh
stage() {  # stage NAME
  train_stage "$1" "configs/shapes_cascade.py:$1,base=$BASE" "${EXTRA[@]}"
}

stage interpolation
stage upscaler
echo "== stages finished in $(($(date +%s) - start)) s"

# The cascade folder: base/, interpolation/, upscaler/ (symlinks; sample and eval load it as one).
CASCADE="$RUNS/cascade"
mkdir -p "$CASCADE"
ln -sfn "$(realpath "$BASE")" "$CASCADE/base"
ln -sfn "$(realpath "$RUNS/interpolation/model")" "$CASCADE/interpolation"
ln -sfn "$(realpath "$RUNS/upscaler/model")" "$CASCADE/upscaler"
"$PYTHON" -m magicvideo_jax.eval.cascade --checkpoint "$CASCADE" --split test \
  --num_prompts "${NUM_PROMPTS:-64}" --json "$RUNS/scores_test.json"
"$PYTHON" -m magicvideo_jax.sample --checkpoint "$CASCADE" --prompt "a red circle moving left" \
  --prompt "a blue square moving up" --prompt "a yellow star growing" \
  --prompt "a green triangle moving right" --output "$RUNS/cascade.gif"
echo "== total $(($(date +%s) - start)) s"
