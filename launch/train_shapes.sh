#!/usr/bin/env bash
# Reproduces the bundled shapes checkpoint (magicvideo_jax/assets/shapes) from nothing: builds the
# moving_shapes dataset, runs MagicVideo's recipe stage by stage, then scores the result.
#
#   bash launch/train_shapes.sh [RUNS_DIR]        (default RUNS_DIR=runs/shapes)
#
# Stages (configs/shapes.py): vae -> image (text-to-image U-Net + text encoder) -> video (adaptors,
# directed temporal attention and fps embedding added to the image model), then video_vae
# (MagicVideo v2's temporal decoder, from the vae stage; WITH_VIDEO_VAE=0 skips it), merged into the
# video model. Each stage resumes from its workdir if interrupted; a finished stage is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-runs/shapes}"
PYTHON="${PYTHON:-.venv/bin/python}"
ASSET="${ASSET:-magicvideo_jax/assets/shapes}"
start=$(date +%s)

stage() {  # stage NAME [extra main.py flags]
  local name="$1"; shift
  if [[ -f "$RUNS/$name/model/config.json" ]]; then
    echo "== $name: done already ($RUNS/$name/model)"; return
  fi
  echo "== $name: training ($(($(date +%s) - start)) s elapsed)"
  "$PYTHON" -m magicvideo_jax.main --config="configs/shapes.py:$name" --workdir="$RUNS/$name" "$@" \
    2>&1 | grep --line-buffered -E "train.py|steps_per_sec|loss=|Error|error" || true
  [[ -f "$RUNS/$name/model/config.json" ]] || { echo "stage $name failed" >&2; exit 1; }
}

stage vae
stage image --config.train.init_from="$RUNS/vae/model"
stage video --config.train.init_from="$RUNS/image/model"
FINAL="$RUNS/video/model"
if [[ "${WITH_VIDEO_VAE:-1}" == 1 ]]; then
  stage video_vae --config.train.init_from="$RUNS/vae/model"
  "$PYTHON" -m magicvideo_jax.checkpoint merge --base "$RUNS/video/model" \
    --other "$RUNS/video_vae/model" --output "$RUNS/final"
  FINAL="$RUNS/final"
fi
echo "== recipe finished in $(($(date +%s) - start)) s"

rm -rf "$ASSET" && mkdir -p "$(dirname "$ASSET")" && cp -r "$FINAL" "$ASSET"
cat > "$ASSET/PROVENANCE.md" <<NOTE
# Bundled shapes checkpoint
Produced by \`bash launch/train_shapes.sh\` (configs/shapes.py stages vae -> image -> video
[-> video_vae], from $FINAL) on $(date -u +%Y-%m-%d), $(nproc) CPU cores, in $(($(date +%s) - start)) s.
NOTE
"$PYTHON" -m magicvideo_jax.eval.shapes --checkpoint "$ASSET" --split test --num_prompts 64
"$PYTHON" -m magicvideo_jax.eval.shapes --checkpoint "$ASSET" --split validation --num_prompts 64
echo "== total $(($(date +%s) - start)) s"
