#!/usr/bin/env bash
# GPU check kit (issue 14): one prepared run for a machine with an NVIDIA H100/H200, PyTorch,
# CuPy and transformers, but no vLLM and no network. About five minutes:
#   1. `continuum-tiered profile --device cuda --tiers cpu,disk:...` for the Llama-3.1-8B
#      shape and one GPU's shard of Llama-3.1-70B at tensor parallel 4 (the deployments of
#      continuum_tiered/core/deployment.py), and a table of measured / derived-H100 figures
#      (continuum_tiered/data/profiles/h100-*.json, continuum_tiered/profiling/compare.py);
#   2. LMCache's own connector storing and loading KV between GPU, CPU and disk, timed
#      (scripts/gpu_check_lmcache.py), when the LMCache wheel for this Python came along;
#   3. the CUDA-only test paths (tests/test_profiling.py's CUDA profile, CuPy copies), if
#      pytest is there.
# Everything lands in one folder (default out/gpu-check/<UTC time>), with summary.txt.
#
#   bash scripts/gpu-check.sh [--out DIR]       the check (needs a CUDA device)
#   bash scripts/gpu-check.sh --rehearse [--out DIR]
#                                               every step on the CPU with the tiny test model
#                                               (checks the kit itself, measures nothing)
#   bash scripts/gpu-check.sh --compare-only DIR
#                                               the comparison table again, from DIR's profiles
#   bash scripts/gpu-check.sh --fetch-wheels [3.X]
#                                               on a machine with network: the wheels the kit
#                                               may lack, for Python 3.X, into $WHEELS/cp3X
#
# Packages the GPU machine lacks come from $WHEELS/cp3X (GPU_CHECK_WHEELS, default
# .cache/gpu-kit/wheels, ignored by git: carry it along with the repository); only those not
# installed are unpacked, into DIR/pylib. Step limits in seconds: PROFILE_TIMEOUT (each
# model, 110), LMCACHE_TIMEOUT (60), TESTS_TIMEOUT (60). Exit 2: the machine lacks what the
# kit needs (named); 1: a step failed; 0: every step passed or was skipped with its reason.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.cache/gpu-kit/wheels}
DEVICE=cuda
MODELS=(llama-3.1-8b llama-3.1-70b-tp4) # each compared with the built-in h100-MODEL profile
MAX_TOKENS=16384                        # the longest context profiled
LMCACHE_TOKENS=8192
LMCACHE_NATIVE=lmcache.cuda_ops # LMCache's CUDA kernels, built against one torch
# Distributions the kit may need beyond torch, numpy and transformers. No dependency is
# resolved on the GPU machine, so each list is complete. The profiler's:
PROFILER_DEPS=(matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing
  python-dateutil packaging aiofiles tqdm)
# LMCache (without its declared dependencies, as bootstrap.sh installs it) and what its
# engine, GPU connector and CPU and disk tiers import (found in a bare torch + transformers
# environment). It imports numba at import time, whose llvmlite wheel alone is 60 MB: more
# than the kit can carry (NOT_CARRIED); the step runs where the machine has numba.
LMCACHE_VERSION=0.5.6
LMCACHE_DEPS=(lmcache numba llvmlite aiofile caio msgspec sortedcontainers prometheus-client
  psutil py-cpuinfo cachetools cbor2 pyyaml aiohttp aiohappyeyeballs aiosignal attrs
  frozenlist multidict propcache yarl idna requests urllib3 certifi charset-normalizer
  cryptography cffi pycparser)
NOT_CARRIED=(numba llvmlite)
# The test module's imports (tests/test_profiling.py imports the whole CLI).
TEST_DEPS=(pytest pluggy iniconfig openai httpx httpcore anyio sniffio h11 distro jiter
  pydantic pydantic-core annotated-types typing-inspection typing-extensions starlette
  uvicorn click aiohttp aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl
  idna certifi)
WHEEL_BUDGET_MIB=60 # what travels with the repository: 64 MiB in all

die() {
  echo "gpu-check: $*" >&2
  exit 2
}

fetch_wheels() {
  local version=${1:-$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}
  local dir="$WHEELS/cp${version/./}" dists=() mib
  local carried=() dist
  for dist in "${PROFILER_DEPS[@]}" "${LMCACHE_DEPS[@]}" "${TEST_DEPS[@]}"; do
    [[ " ${NOT_CARRIED[*]} ${carried[*]} " == *" $dist "* ]] || carried+=("$dist")
  done
  # The versions of the project's own environment (tested together), where it has them.
  mapfile -t dists < <("${VENV_PYTHON:-.venv/bin/python}" -c '
import importlib.metadata as metadata, sys
for dist in sys.argv[1:]:
    try:
        print(f"{dist}=={metadata.version(dist)}")
    except metadata.PackageNotFoundError:
        print(dist)
' "${carried[@]}" 2>/dev/null || printf '%s\n' "${carried[@]}")
  mkdir -p "$dir"
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dir" "${dists[@]}" ||
    die "could not download the wheels for Python $version"
  mib=$(du -sm "$dir" | cut -f1)
  echo "gpu-check: $(find "$dir" -name '*.whl' | wc -l) wheels, ${mib} MiB in $dir"
  [ "$mib" -le "$WHEEL_BUDGET_MIB" ] ||
    die "$dir holds ${mib} MiB, over the kit's ${WHEEL_BUDGET_MIB} MiB"
}

# unpack_missing DIST...: unpack into $PYLIB the wheel of each distribution that is not
# installed; prints those still missing (no wheel for them in $WHEELS/$PYTAG).
unpack_missing() {
  "$PY" -c '
import importlib.metadata as metadata, re, sys, zipfile
from pathlib import Path

wheels, target, missing = Path(sys.argv[1]), Path(sys.argv[2]), []
for dist in sys.argv[3:]:
    try:
        metadata.version(dist)
        continue
    except metadata.PackageNotFoundError:
        pass
    stem = re.sub(r"[-_.]+", "_", dist).lower()
    found = sorted(w for w in wheels.glob("*.whl") if w.name.lower().startswith(stem + "-"))
    if not found:
        missing.append(dist)
        continue
    with zipfile.ZipFile(found[-1]) as wheel:
        wheel.extractall(target)
print(" ".join(missing))
' "$WHEELS/$PYTAG" "$PYLIB" "$@"
}

compare() {
  local dir=$1 pairs=() model
  for model in "${MODELS[@]}"; do pairs+=("$dir/$model.json" "$(derived "$model")"); done
  PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} "$PY" -m continuum_tiered.profiling.compare \
    --out "$dir/comparison.md" "${pairs[@]}"
}

derived() { if [ "$DEVICE" = cuda ]; then echo "h100-$1"; else echo "cpu-$1"; fi; }

STATUS=()
FAILED=0
record() { STATUS+=("$(printf '%-32s %s' "$1" "$2")"); }

# run_step NAME SECONDS LOG COMMAND...: run with a time limit; record ok, failed or timed out.
run_step() {
  local name=$1 limit=$2 log=$3 rc=0
  shift 3
  echo "== $name (limit ${limit}s, log $log)"
  timeout "$limit" "$@" >"$log" 2>&1 || rc=$?
  tail -n 5 "$log"
  case $rc in
    0) record "$name" ok ;;
    124) record "$name" "FAILED: timed out after ${limit}s (see $log)" ;;
    *) record "$name" "FAILED: exit $rc (see $log)" ;;
  esac
  [ "$rc" -eq 0 ] || FAILED=1
}

OUT=out/gpu-check/$(date -u +%Y%m%dT%H%M%SZ)
while [ $# -gt 0 ]; do
  case $1 in
    --fetch-wheels)
      fetch_wheels "${2:-}"
      exit 0
      ;;
    --compare-only)
      [ -n "${2:-}" ] || die "--compare-only needs the folder of a previous run"
      compare "$2"
      exit $?
      ;;
    --out)
      [ -n "${2:-}" ] || die "--out needs a folder"
      OUT=$2
      shift
      ;;
    --rehearse)
      DEVICE=cpu MODELS=(tiny-llama) MAX_TOKENS=1024 LMCACHE_TOKENS=512 LMCACHE_NATIVE=
      ;;
    *) die "unknown argument $1; usage: gpu-check.sh [--rehearse] [--out DIR] | --compare-only DIR | --fetch-wheels [3.X]" ;;
  esac
  shift
done
mkdir -p "$OUT" || die "cannot create $OUT"
OUT=$(cd "$OUT" && pwd)
PYLIB=$OUT/pylib
SUMMARY=$OUT/summary.txt

# ------------------------------------------------------------------ what the kit needs
command -v "$PY" >/dev/null || die "needs Python 3 ($PY not found; set PYTHON=...)"
PYTAG=$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
if [ "$DEVICE" = cpu ]; then
  device="CPU rehearsal: the tiny test model, nothing measured for a GPU"
elif ! device=$("$PY" -c '
import sys
try:
    import torch
except ImportError as exc:
    sys.exit(f"needs PyTorch with CUDA: cannot import torch ({exc})")
if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
    sys.exit(
        f"needs an NVIDIA CUDA device (H100/H200): torch {torch.__version__} sees no CUDA "
        f"device (torch.cuda.is_available() is False; CUDA build: {torch.version.cuda})"
    )
name = torch.cuda.get_device_name(0)
print(f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
' 2>&1); then
  echo "gpu-check: ${device##*$'\n'}" | tee "$SUMMARY" >&2
  exit 2
fi
"$PY" -c "import transformers" 2>/dev/null || die "needs transformers (cannot import it)"
mkdir -p "$PYLIB"
export PYTHONPATH=$REPO:$PYLIB${PYTHONPATH:+:$PYTHONPATH}
export TOKENIZERS_PARALLELISM=false
missing=$(unpack_missing "${PROFILER_DEPS[@]}")
[ -z "$missing" ] || die "the profiler needs $missing: no wheel in $WHEELS/$PYTAG (run \
'bash scripts/gpu-check.sh --fetch-wheels 3.${PYTAG#cp3}' on a machine with network)"
echo "gpu-check: $device; Python $PYTAG; outputs in $OUT"
"$PY" -c "import vllm" 2>/dev/null && echo "gpu-check: note: vLLM is installed; the kit does not use it"
record device "$device"

# ------------------------------------------------------------------ 1. tier profiles
DISK=$OUT/disk-tier
mkdir -p "$DISK"
for model in "${MODELS[@]}"; do
  "$PY" -c '
import json, sys
from continuum_tiered.core.deployment import Deployment
from continuum_tiered.core.tiny_model import TinyLlamaShape, hf_config

model = sys.argv[1]
shape = hf_config(TinyLlamaShape()) if model == "tiny-llama" else Deployment(model).hf_config()
config = {**shape, "_name_or_path": model}
open(sys.argv[2], "w").write(json.dumps(config, indent=2))
' "$model" "$OUT/$model.config.json" || die "cannot write the config of $model"
  # `continuum-tiered profile`, without the other subcommands' imports (server, vLLM).
  run_step "profile $model" "${PROFILE_TIMEOUT:-110}" "$OUT/$model.profile.log" \
    "$PY" -c '
import argparse, sys
from continuum_tiered.profiling import cli

parser = argparse.ArgumentParser(prog="continuum-tiered")
cli.add_profile_parser(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(["profile", *sys.argv[1:]])
try:
    sys.exit(args.run(args, []))
except ValueError as err:
    sys.exit(f"continuum-tiered profile: error: {err}")
' --model "$OUT/$model.config.json" --device "$DEVICE" --tiers "cpu,disk:$DISK" \
    --quick --max-tokens "$MAX_TOKENS" --out "$OUT/$model.json"
done
rm -rf "$DISK"
if compare "$OUT" >"$OUT/comparison.log" 2>&1; then
  record comparison "ok: $OUT/comparison.md"
else
  record comparison "FAILED: a profile is missing (see $OUT/comparison.log)"
  FAILED=1
fi

# ------------------------------------------------------------------ 2. LMCache
missing=$(unpack_missing "${LMCACHE_DEPS[@]}")
if [[ " $missing " == *" numba "* ]]; then
  record "lmcache store/load" "skipped: LMCache imports numba, which this machine lacks and \
the kit cannot carry (llvmlite alone is 60 MB); install numba here to run this step"
elif [ -n "$missing" ]; then
  record "lmcache store/load" "skipped: no wheel for $missing in $WHEELS/$PYTAG (--fetch-wheels)"
elif ! error=$("$PY" -c "import lmcache.v1.cache_engine${LMCACHE_NATIVE:+, $LMCACHE_NATIVE}" 2>&1); then
  record "lmcache store/load" "skipped: LMCache $LMCACHE_VERSION does not load against this \
torch: ${error##*$'\n'}"
else
  run_step "lmcache store/load" "${LMCACHE_TIMEOUT:-60}" "$OUT/lmcache.log" \
    "$PY" scripts/gpu_check_lmcache.py --config "$OUT/${MODELS[0]}.config.json" \
    --device "$DEVICE" --tokens "$LMCACHE_TOKENS" --disk "$OUT/lmcache-disk" \
    --out "$OUT/lmcache.json"
  rm -rf "$OUT/lmcache-disk"
fi

# ------------------------------------------------------------------ 3. CUDA-only tests
missing=$(unpack_missing "${TEST_DEPS[@]}")
if ! "$PY" -c "import pytest" 2>/dev/null; then
  record "CUDA test paths" "skipped: pytest is not installed (--fetch-wheels brings it)"
elif ! error=$("$PY" -c "import continuum_tiered.cli" 2>&1); then
  record "CUDA test paths" "skipped: tests/test_profiling.py imports continuum_tiered.cli: \
${error##*$'\n'}${missing:+ (no wheel for $missing)}"
else
  run_step "CUDA test paths" "${TESTS_TIMEOUT:-60}" "$OUT/tests.log" \
    "$PY" -m pytest -q -p no:cacheprovider -k cuda tests/test_profiling.py
fi

{
  echo "gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ): outputs in $OUT"
  printf '%s\n' "${STATUS[@]}"
  echo
  [ -f "$OUT/comparison.md" ] && cat "$OUT/comparison.md"
  [ -f "$OUT/lmcache.json" ] && grep -h "^lmcache" "$OUT/lmcache.log"
} | tee "$SUMMARY"
exit "$FAILED"
