#!/usr/bin/env bash
# Every check that needs an NVIDIA GPU, in one run: the `gpu`-marked tests at real sizes (the bf16
# kernels, and the FP8-expert kernels where the GPU has FP8 tensor cores), then the kernel benchmark
# (tuning first, then the MoE block in bf16 and with FP8 experts at T = 1, 8, 64, 512, 4096 against
# the floors, the FP8 block's error against fp32, and greedy decode in bf16 and with FP8 experts).
# Everything lands in the results folder: gpu_env.txt, gpu_tests.log, bench.log,
# bench_kernels_h200.json and bench_kernels_h200.md.
#
#   bash benchmarks/gpu_checks.sh [results folder]     # default: $OUT, else benchmarks/_work
#   TUNE_FLAG= bash benchmarks/gpu_checks.sh           # without the tuning sweep (the table's configs)
#   BENCH_ARGS=--skip-fp8 bash benchmarks/gpu_checks.sh  # bf16 only
#
# The default limits (tests 150 s, benchmark 430 s) keep one call under 10 minutes; every part
# writes its results as it finishes, so a run cut short keeps what it measured.
#
# Needs python3 with a CUDA build of torch, triton and transformers (no network). moetrt need not
# be installed: when it is not importable, a small import hook maps the stage folders (export/,
# optimize/, runtime/, parity/) into the package, as the installed layout does.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-benchmarks/_work}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if ! $PY -c "import moetrt.runtime" 2>/dev/null; then
    SHIM=$(mktemp -d)
    cat >"$SHIM/sitecustomize.py" <<EOF
import importlib.abc, importlib.util, os, sys

_REPO = "$PWD"
_STAGES = {"moetrt.export": "export", "moetrt.optimize": "optimize", "moetrt.runtime": "runtime", "moetrt.parity": "parity"}


class _StageFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        folder = _STAGES.get(name)
        if folder is None:
            return None
        root = os.path.join(_REPO, folder)
        return importlib.util.spec_from_file_location(name, os.path.join(root, "__init__.py"), submodule_search_locations=[root])


sys.meta_path.insert(0, _StageFinder())
EOF
    export PYTHONPATH="$SHIM:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    date -u +"%Y-%m-%d %H:%M:%S UTC"
    $PY -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv
} 2>&1 | tee "$OUT_DIR/gpu_env.txt"

status=0
timeout "${TEST_TIMEOUT:-150}" $PY -m pytest -q -p no:cacheprovider -m gpu tests/moetrt/kernels/test_kernels_gpu.py \
    tests/moetrt/kernels/test_kernels_fp8_gpu.py 2>&1 | tee "$OUT_DIR/gpu_tests.log" | tail -n 25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

timeout "${BENCH_TIMEOUT:-430}" $PY benchmarks/bench_kernels_h200.py ${TUNE_FLAG---tune} --out "$OUT_DIR" ${BENCH_ARGS:-} \
    >"$OUT_DIR/bench.log" 2>&1
[ $? -eq 0 ] || status=1
tail -n 60 "$OUT_DIR/bench.log"
exit $status
