#!/usr/bin/env bash
# Prepares what benchmarks/device_check.py takes to a GPU machine that has no network:
#   .whl/    Python 3.12 x86-64 wheels of benchmarks/device_requirements.txt
#   .carry/  the CIFAR-10 JPEG archive (19 MB; a prepared data set would be ~140 MB)
# Both folders are git-ignored. Usage: bash benchmarks/fetch_device_wheels.sh [ARCHIVE]
set -euo pipefail
cd "$(dirname "$0")/.."
archive="${1:-../shared/data/cifar10_jpeg.tar.xz}"
rm -rf .whl && mkdir -p .whl .carry
# promise has no wheel on PyPI (an sdist only): build its pure-Python wheel here.
grep -v '^#' benchmarks/device_requirements.txt | grep -v '^promise==' | python3 -m pip download -q --no-deps \
    --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl -r /dev/stdin
python3 -m pip wheel -q --no-deps -w .whl "$(grep '^promise==' benchmarks/device_requirements.txt)"
cp "$archive" .carry/cifar10_jpeg.tar.xz
du -sh .whl .carry
