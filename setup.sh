#!/usr/bin/env bash
# Sets up fastland on a fresh machine: the Debian packages for headless rendering, a .venv
# at the repo root with torch (CPU or CUDA build), and fastland with its viz and dev extras.
# It is idempotent: a second run only checks that nothing changed.
set -euo pipefail
cd "$(dirname "$0")"

# 1. Debian packages for offscreen PyVista rendering through EGL (Mesa llvmpipe), and a real browser
#    (headless Chromium) that the tests use to look at the HTML export.
apt_pkgs=(libegl1 libegl-mesa0 libgl1-mesa-dri chromium)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if command -v apt-get >/dev/null && { [ -z "$sudo" ] || command -v sudo >/dev/null; }; then
    echo "setup: installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: warning: cannot install ${missing[*]} (no apt-get/sudo); 3-D renders may fail" >&2
  fi
fi

# 2. The virtual environment.
[ -x .venv/bin/python ] || python3 -m venv .venv
PY=.venv/bin/python
stamp=.venv/.fastland-setup
want=$(cat pyproject.toml setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && $PY -c "import fastland, torch" 2>/dev/null; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1

# 3. torch: the CUDA build where a GPU driver is present; otherwise the CPU build
#    (pip's find-links supplies torch 2.13.0+cpu on these machines; a bare `torch` would pull GBs of CUDA).
if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: CUDA driver found: installing torch (CUDA build)"
    $PY -m pip install -q torch
  else
    echo "setup: no CUDA driver: installing torch 2.13.0 (CPU build where available)"
    $PY -m pip install -q "torch==2.13.0"
  fi
fi

# 4. fastland and everything else, with torch pinned to what is installed so nothing swaps it.
torch_version=$($PY -c "import torch; print(torch.__version__)")
echo "torch==${torch_version}" > .venv/constraints.txt
echo "setup: installing fastland (torch ${torch_version})"
$PY -m pip install -q -c .venv/constraints.txt -e ".[viz,dev]"
$PY -c "import fastland, torch, h5py, pyvista, pytest" # fails the setup loudly if the install did not work
echo "$want" > "$stamp"
echo "setup: done"
