# Sourced by the miniature recipes (launch/train_*.sh); needs PYTHON, RUNS and start set.
#
#   train_stage NAME CONFIG [main.py flags...]
#
# trains one stage in $RUNS/NAME (resuming its workdir) unless its export $RUNS/NAME/model exists,
# printing only progress lines, each prefixed with [NAME]; returns 1 if no export was written.
train_stage() {
  local name="$1" config="$2"; shift 2
  if [[ -f "$RUNS/$name/model/config.json" ]]; then
    echo "== $name: done already ($RUNS/$name/model)"; return 0
  fi
  echo "== $name: training ($(($(date +%s) - start)) s elapsed)"
  "$PYTHON" -m magicvideo_jax.main --config="$config" --workdir="$RUNS/$name" "$@" 2>&1 \
    | grep --line-buffered -E "train.py|context.py|steps_per_sec|loss=|evaluation at|Error|error" \
    | sed -u "s/^/[$name] /" || true
  [[ -f "$RUNS/$name/model/config.json" ]] || { echo "stage $name failed" >&2; return 1; }
  echo "== $name: finished ($(($(date +%s) - start)) s elapsed)"
}
