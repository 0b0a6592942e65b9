#!/usr/bin/env bash
# One-time set-up on a fresh machine, safe to re-run: ffmpeg, shellcheck, Python 3.12 virtualenv in .venv,
# the package with its test extra. Re-installs only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# ffmpeg: media for the data pipeline and tests; shellcheck: the SLURM scripts' lint test
missing=()
command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1 || missing+=(ffmpeg)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
# a headless JRE: pycocoevalcap's PTB tokenizer and METEOR (caption scores comparable to published ones)
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing ${missing[*]} (Debian packages)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

find_python312() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  # a python3.12 on PATH that really runs (a pyenv shim may exist without being selected)
  if command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys' >/dev/null 2>&1; then
    command -v python3.12; return
  fi
  if command -v pyenv >/dev/null 2>&1; then
    local root; root=$(pyenv root)
    local found; found=$(ls -d "$root"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -n1 || true)
    if [ -z "$found" ]; then
      echo "[setup] installing Python 3.12 with pyenv" >&2
      pyenv install -s 3.12 >&2
      found=$(ls -d "$root"/versions/3.12*/bin/python3.12 | sort -V | tail -n1)
    fi
    echo "$found"; return
  fi
  echo "Python 3.12 not found: install it (pyenv install 3.12) or set PYTHON=/path/to/python3.12" >&2
  exit 1
}

if [ ! -x .venv/bin/python ]; then
  py=$(find_python312)
  echo "[setup] creating .venv with $py"
  "$py" -m venv .venv
fi

stamp=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat .venv/.setup-stamp 2>/dev/null || true)" != "$stamp" ]; then
  echo "[setup] installing nemo_avllm and its dependencies into .venv (first time: several GB, a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test,decoders]'
  # lmms-eval (the `avllm` model plugin's harness) without its own requirements: they would upgrade
  # numpy to 2.x; what it needs to run is in the `lmms` extra above
  .venv/bin/python -m pip install -q --no-deps 'lmms-eval==0.7.3'
  echo "$stamp" > .venv/.setup-stamp
fi
echo "[setup] ready: $(.venv/bin/python --version), torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
