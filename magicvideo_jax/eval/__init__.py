"""Evaluation of generated and reconstructed videos (e.g. `judge`: the moving-shapes judge)."""

import json
from typing import Any

from etils import epath


def write_json(path: str, results: Any) -> None:
  """An evaluator's `--json` report, at a local or cloud path (its folder made if missing)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results, indent=1))
