#!/usr/bin/env bash
# Reproduces the bundled shapes checkpoint (magicvideo_jax/assets/shapes) from nothing: builds the
# moving_shapes dataset, runs MagicVideo's recipe stage by stage, then scores the result.
#
#   bash launch/train_shapes.sh [RUNS_DIR]        (default RUNS_DIR=runs/shapes)
#
# Stages (configs/shapes.py): vae -> image (text-to-image U-Net + text encoder) -> video (adaptors,
# directed temporal attention and fps embedding added to the image model) -> video2 -> ... -> video6
# (warm restarts: the video stage again from the previous result, learning rate warmed up again;
# RESTARTS=N keeps the first N, default 5); video_vae (MagicVideo v2's
# temporal decoder, from the vae stage; WITH_VIDEO_VAE=0 skips it) trains beside image and video
# (two processes use the 2 cores better than one) and is merged into the video model. Each stage
# resumes from its workdir if interrupted; a finished stage is skipped. SKIP_EVAL=1 skips the scoring.
#
# QUICK=1: the same recipe on the 30-minute budget (configs/shapes.py `STAGE,quick`: shorter vae,
# image and video stages, no restarts, no video_vae, every stage on CPU_DEVICES devices); the result
# goes to $RUNS/bundle (ASSET), not over the shipped checkpoint.
#   QUICK=1 bash launch/train_shapes.sh runs/shapes_quick
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-runs/shapes}"
PYTHON="${PYTHON:-.venv/bin/python}"
# One process over CPU_DEVICES data-parallel CPU devices: faster than one device on 2 cores
# (ignored on GPU and TPU, where the accelerators are the devices).
DEVICES="--num_cpu_devices=${CPU_DEVICES:-$(nproc)}"
VARIANT="" EARLY_DEVICES=()
if [[ "${QUICK:-0}" == 1 ]]; then
  VARIANT=",quick" RESTARTS=0 WITH_VIDEO_VAE=0 EARLY_DEVICES=("$DEVICES")
  ASSET="${ASSET:-$RUNS/bundle}"
fi
ASSET="${ASSET:-magicvideo_jax/assets/shapes}"
start=$(date +%s)

source launch/stage.sh
stage() {  # stage NAME [extra main.py flags]
  local name="$1"; shift
  train_stage "$name" "configs/shapes.py:$name$VARIANT" "$@"
}

stage vae "${EARLY_DEVICES[@]}"
video_vae_pid=""
if [[ "${WITH_VIDEO_VAE:-1}" == 1 ]]; then
  stage video_vae --config.train.init_from="$RUNS/vae/model" &
  video_vae_pid=$!
fi
stage image --config.train.init_from="$RUNS/vae/model" "${EARLY_DEVICES[@]}"
stage video --config.train.init_from="$RUNS/image/model" "$DEVICES"
previous=video
for name in $("$PYTHON" -c "from configs import shapes; print(*shapes.RESTARTS)"); do
  (( ${name#video} - 1 <= ${RESTARTS:-5} )) || break
  stage "$name" --config.train.init_from="$RUNS/$previous/model" "$DEVICES"
  previous="$name"
done
FINAL="$RUNS/$previous/model"
if [[ -n "$video_vae_pid" ]]; then
  wait "$video_vae_pid"
  "$PYTHON" -m magicvideo_jax.weights.checkpoint merge --base "$FINAL" \
    --other "$RUNS/video_vae/model" --output "$RUNS/final"
  FINAL="$RUNS/final"
fi
elapsed=$(($(date +%s) - start))
echo "== recipe finished in $elapsed s"

rm -rf "$ASSET" && mkdir -p "$(dirname "$ASSET")" && cp -r "$FINAL" "$ASSET"
cat > "$ASSET/PROVENANCE.md" <<NOTE
# Bundled shapes checkpoint
Produced by \`${QUICK:+QUICK=$QUICK }bash launch/train_shapes.sh $RUNS\` (configs/shapes.py${VARIANT:+ variant $VARIANT}: stages
vae -> image -> video$([[ $previous == video ]] || echo ", warm restarts up to $previous")${video_vae_pid:+, video_vae beside them and merged}; from $FINAL) on $(date -u +%Y-%m-%d), $(nproc) CPU cores, in $elapsed s.
Scores and stage times: BENCHMARKS.md, "Shapes".
NOTE
if [[ "${SKIP_EVAL:-0}" != 1 ]]; then
  for split in test validation; do
    "$PYTHON" -m magicvideo_jax.eval.shapes --checkpoint "$ASSET" --split "$split" --num_prompts 64 \
      --json "$RUNS/scores_$split.json"
  done
fi
echo "== total $(($(date +%s) - start)) s"
