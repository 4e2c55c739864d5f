#!/usr/bin/env bash
# What to measure on a GPU machine, in stages that each fit in ten minutes. From the repo
# root, with the project installed (`pip install -e ".[test,bench]"`), or with only its
# dependencies on PYTHONPATH (the lent GPU: wheels.sh's .whl installed to /tmp/site), in
# which case the package `gptoss_ray` is laid out first in a temporary folder, its
# subpackages linked to this checkout's folders (no build, no network):
#   bash benchmarks/gpu.sh STAGE
#   check   the GPU tests (kernels vs torch in bf16, captured decode graphs), then the
#           kernels alone in gpt-oss-20b shapes against the memory floor, beside their
#           static issue bound (bench sass)
#   20b     full-size gpt-oss-20b (random weights): batch 1 (with and without graphs),
#           64 and 256, beside transformers on the same weights
#   120b    full-size gpt-oss-120b on the one GPU: batch 1 and 64 (transformers does not fit)
#   model   the scaling model calibrated on this GPU, 1 to 64 GPUs
#   sweep   the engine through Ray (one shard, the built-in model): TTFT, ITL and the
#           coordinator's and Ray's share of a step against batch size
# Logs, JSON and PNG go to $OUT (the device tool's folder) or benchmarks/out.
set -uo pipefail
stage=${1:?usage: bash benchmarks/gpu.sh check|20b|120b|model|sweep}
out=${OUT:-benchmarks/out}
mkdir -p "$out"
log="$out/$stage.log"
export PYTHONUNBUFFERED=1
# link:begin (tests/test_install.py runs this block)
if ! python3 -c "import gptoss_ray.cluster" 2>/dev/null; then
  site=$(mktemp -d) && mkdir "$site/gptoss_ray" || exit 1
  # pyproject's package-dir says which folder is which subpackage, as in the wheel
  python3 - "$site/gptoss_ray" <<'PY' || exit 1
import os, sys, tomllib
dirs = tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["package-dir"]
for name, folder in dirs.items():
    os.symlink(os.path.abspath(folder), os.path.join(sys.argv[1], name.split(".")[-1]))
PY
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# link:end
bench() { python3 -m gptoss_ray.benchmarks.cli --out "$out" "$@" 2>&1 | tee -a "$log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"
case "$stage" in
  check)
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/model/test_kernels.py \
      tests/shards/test_decode_graphs.py 2>&1 | tee -a "$log"
    bench sass --tokens 1,4,64
    bench kernels --model gpt-oss-20b ;;
  20b) bench fullsize --model gpt-oss-20b --batches 1,64,256 ;;
  120b) bench fullsize --model gpt-oss-120b --batches 1,64 --no-peer ;;
  model) bench model ;;
  sweep) bench sweep --model gpt-oss-tiny --shards 1 --device cuda --batches 1,16,64,256 \
           --shapes 128x32 --repeats 3 ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
