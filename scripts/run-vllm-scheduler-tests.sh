#!/usr/bin/env bash
# vLLM's own scheduler and prefix-caching tests (from the installed vLLM's source
# distribution, cached in .cache/vllm-upstream/) with ContinuumConnector attached, in four
# variants, compared with tests/upstream/vllm-scheduler-expectations.txt. Arguments go to
# tests/upstream/run_vllm_suite.py (--variants a,b --rev HEAD -k EXPR --jobs N).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/bootstrap.sh
exec .venv/bin/python tests/upstream/run_vllm_suite.py "$@"
