#!/usr/bin/env bash
# What benchmarks/gpu_check.sh needs on a device machine that has no network, made here once:
#   .whl/   diffusers 0.42.1 and importlib_metadata (the machine has diffusers' other needs), and
#           torch-fidelity 0.4.0 (FID's network, for the Inception speed), as wheels for its Python 3.12
#   .data/  the CIFAR-10 JPEGs (../shared/data/cifar10-jpeg.tar.gz, checksum verified)
# Both folders are kept out of git (.git/info/exclude) and travel with `carry` (BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
for d in /.whl/ /.data/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
mkdir -p .whl .data
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 importlib_metadata==8.7.0 torch-fidelity==0.4.0
src=../shared/data/cifar10-jpeg.tar.gz
sha=b0aef700456443dee047bc044d4b6294d58d134b19500abbab6e986079bc8ec8
if [ -f "$src" ]; then
    echo "$sha  $src" | sha256sum -c --quiet && cp "$src" .data/cifar10-jpeg.tar.gz
else
    echo "gpu_check_prepare: $src not found; the check will train on synthetic images" >&2
fi
du -sh .whl .data
