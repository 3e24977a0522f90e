#!/usr/bin/env bash
# CMD in miniature (configs/cmd_shapes.py): the autoencoder, the content-frame model and the motion
# DiT, each from the previous stage's export, then the evaluation (autoencoder gates, the motion DiT
# alone, CMD beside MagicVideo) and the judge on full generations.
#
#   bash launch/train_cmd.sh [RUNS_DIR]        (default RUNS_DIR=runs/cmd_shapes)
#
# BASE: the shapes model the VAE, text encoder and U-Net start from (default the bundled
#       magicvideo_jax/assets/shapes). LATENTS: the name of moving_shapes encoded by BASE's VAE
#       (encoded_latents/LATENTS, built first if missing; default shapes_bundle, `none` trains on
#       pixels). NUM_PROMPTS: prompts / clips per split of the evaluation (default 64). Each stage
#       resumes from its workdir if interrupted; a finished stage is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-runs/cmd_shapes}"
PYTHON="${PYTHON:-.venv/bin/python}"
BASE="${BASE:-magicvideo_jax/assets/shapes}"
NUM_PROMPTS="${NUM_PROMPTS:-64}"
LATENTS="${LATENTS:-shapes_bundle}"
DATA_DIR="${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}"
[[ -f "$BASE/config.json" ]] || { echo "base model folder $BASE not found" >&2; exit 1; }
start=$(date +%s)

source launch/stage.sh
stage() {  # stage NAME
  train_stage "$1" "configs/cmd_shapes.py:$1,base=$BASE,runs=$RUNS,latents=$LATENTS"
}

if [[ "$LATENTS" != none && ! -d "$DATA_DIR/encoded_latents/$LATENTS" ]]; then
  echo "== encoding moving_shapes with $BASE's VAE into encoded_latents/$LATENTS"
  "$PYTHON" -m magicvideo_jax.tools.encode_latents --source moving_shapes/default \
    --checkpoint "$BASE" --resolution 32 --name "$LATENTS" --splits train,validation --dtype float32
fi
stage ae
stage content
stage motion
echo "== trained in $(($(date +%s) - start)) s; evaluating"
"$PYTHON" -m magicvideo_jax.eval.cmd --checkpoint "$RUNS/motion/model" --magicvideo "$BASE" \
  --num_clips "$NUM_PROMPTS" --json "$RUNS/eval_cmd.json"
for split in test validation; do
  "$PYTHON" -m magicvideo_jax.eval.shapes --checkpoint "$RUNS/motion/model" --split "$split" \
    --num_prompts "$NUM_PROMPTS" --json "$RUNS/judge_$split.json"
done
echo "== done in $(($(date +%s) - start)) s"
