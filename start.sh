#!/usr/bin/env bash
# Run the backend in embedded mode (models in this process) on http://0.0.0.0:${PORT:-9090}.
#   ./start.sh --tiny   tiny random-weight models built locally (works offline; output is meaningless)
#   ./start.sh          the real models: GROUNDING_DINO_MODEL / SAM_MODEL (hub ids or local dirs)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$REPO/scripts/bootstrap.sh"
bootstrap_app
cd "$REPO"
if [ "${1:-}" = "--tiny" ]; then
  shift
  if [ ! -f models/tiny/sam/config.json ]; then .venv/bin/python -m backend make-tiny-models models/tiny; fi
  if [ ! -f models/tiny/sam2-video/config.json ]; then
    .venv/bin/python -m backend make-tiny-models models/tiny --family sam2-video  # video projects' tracker
  fi
  export GROUNDING_DINO_MODEL="$REPO/models/tiny/grounding-dino" SAM_MODEL="$REPO/models/tiny/sam"
  export TRACKER_MODEL="$REPO/models/tiny/sam2-video"
  export BOX_THRESHOLD="${BOX_THRESHOLD:-0}" TEXT_THRESHOLD="${TEXT_THRESHOLD:-0}" MAX_DETECTIONS="${MAX_DETECTIONS:-5}"
fi
exec .venv/bin/gunicorn --bind "0.0.0.0:${PORT:-9090}" --workers 1 --threads "${THREADS:-8}" --timeout 300 "$@" _wsgi:app
