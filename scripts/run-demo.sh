#!/usr/bin/env bash
# The main job: vanilla vLLM against continuum-tiered on the CPU build (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/continuum-tiered demo "$@"
