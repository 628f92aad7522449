#!/usr/bin/env bash
# Copies the CIFAR-10 JPEG archive into .carry/ so that it travels to the GPU machine.
#
# Usage: bash benchmarks/carry_data.sh [ARCHIVE]    (default ../shared/data/cifar10-jpeg.tar.gz)
#
# .carry/ is ignored by git (never committed), and the device tool copies an ignored folder only
# when a call names it: run the study stage with carry=[".carry"]. The GPU runner's study stage
# reads .carry/cifar10-jpeg.tar.gz and checks its sha256 before using it.
set -euo pipefail
cd "$(dirname "$0")/.."

src=${1:-../shared/data/cifar10-jpeg.tar.gz}
dst=.carry/cifar10-jpeg.tar.gz
want=820394552d8cd6cf2834c7f34753d3e36624717e73e6a373a57a01edb25bc5f0  # ../shared/data/README.md

if [ ! -f "$src" ]; then
  echo "error: $src not found; give the path of cifar10-jpeg.tar.gz as the first argument" >&2
  exit 2
fi
mkdir -p .carry
if ! git check-ignore -q "$dst" 2>/dev/null; then
  echo "error: $dst would not be ignored by git; add the line '/.carry/' to .gitignore first" >&2
  exit 2
fi
if [ -f "$dst" ] && [ "$(sha256sum "$dst" | cut -d' ' -f1)" = "$want" ]; then
  echo "carry_data: $dst is already there and intact"
else
  cp "$src" "$dst.tmp"
  got=$(sha256sum "$dst.tmp" | cut -d' ' -f1)
  if [ "$got" != "$want" ]; then
    rm -f "$dst.tmp"
    echo "error: $src has sha256 $got, not the $want that ../shared/data/README.md gives; get a fresh copy" >&2
    exit 2
  fi
  mv "$dst.tmp" "$dst"
  echo "carry_data: copied $src to $dst ($(du -h "$dst" | cut -f1), sha256 checked)"
fi
echo "carry_data: name .carry in the device call's carry list, e.g. run(command=\"bash benchmarks/gpu.sh study \$OUT\", carry=[\".carry\"])"
