#!/usr/bin/env bash
# One prepared run for a lent GPU machine: the CUDA tests, then the GPU benches, logs and JSON under
# ${OUT:-bench-out}. With --smoke (or SMOKE=1) the same benches at their CPU smoke sizes and no CUDA
# tests: what tests/test_bench_smoke.py runs here.
#
#   bash bench/gpu_check.sh            # the GPU machine: python3 there holds torch 2.11 + CUDA
#   bash bench/gpu_check.sh --smoke    # anywhere, in seconds (PYTHON=.venv/bin/python by default when it exists)
#
# Stages, each under its own time limit (tests 90 s, gpu 240, experts 150, lora 90) and all inside TOTAL_S
# (570 s: the device tool runs one command for at most 600 s; expected ~7 minutes in all), each run even
# when an earlier one failed; the exit status is 0 only when all passed:
#   tests.log    the tests marked skipif(not torch.cuda.is_available()) in test files that import
#                neither ray nor pipeline.* (ray is not installed there), picked from the sources
#   gpu.log/json bench/gpu.py: one step at Wan2.1-1.3B 832x480x81, ours vs diffusers, MFU, a distilled video
#   experts.log  bench/experts.py --device cuda --dim 5120 --layers $EXPERT_LAYERS: the A14B expert swap.
#                EXPERT_LAYERS is 2 by default: experts.py draws its random weights on the CPU (~30M
#                values/s) and quantizes them there (~50M/s), so 8 blocks (2 x 3.4G values) would take
#                ~6 minutes before the first swap; 2 blocks (0.9 GB per Q8_0 expert) take ~1.5 minutes
#   lora.log/json bench/lora.py --device cuda at full size (32,760 tokens)
#   summary.txt  the environment, and each stage's exit status and seconds
#
# There is no network there. gguf, diffusers, pydantic, av and ftfy (and what they need that the
# machine lacks) travel as cp312 wheels in .whl/ (about 45 MiB of the 64 MiB a call carries), fetched
# once here with the command of the device notes (/work/.library/device/README.md), from the repo root:
#
#   echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     gguf==0.19.0 diffusers==0.42.1 pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 typing_extensions==4.16.0 av==18.1.0 ftfy==6.3.1 wcwidth==0.9.4
#
# (the versions of constraints.txt; diffusers' other needs, huggingface-hub >= 1.32, regex, filelock,
# requests, Pillow, safetensors >= 0.8, are on the machine). Then the device tool's call is
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
# and the wheels are installed at the start into /tmp/site (skipped when .whl holds none).
set -u
cd "$(dirname "$0")/.."

SMOKE=${SMOKE:-0}
for arg in "$@"; do
  case $arg in
    --smoke) SMOKE=1 ;;
    *) echo "usage: bash bench/gpu_check.sh [--smoke]" >&2; exit 2 ;;
  esac
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${OUT:-bench-out}
TOTAL_S=${TOTAL_S:-570}
EXPERT_LAYERS=${EXPERT_LAYERS:-2}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
summary=$OUT/summary.txt
: >"$summary"
status=0

if [ "$SMOKE" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  start=$SECONDS
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || { echo "installing .whl/*.whl failed" | tee -a "$summary"; exit 1; }
  echo "installed $(ls .whl/*.whl | wc -l) wheels into /tmp/site in $((SECONDS - start)) s" | tee -a "$summary"
fi

{
  echo "python: $PYTHON; smoke: $SMOKE; OUT: $OUT"
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
    "cuda", torch.cuda.is_available() and torch.cuda.get_device_name())' 2>&1
  if [ "$SMOKE" != 1 ]; then nvidia-smi -L 2>&1; fi
} | tee -a "$summary"

# stage NAME LIMIT_S LOG COMMAND...: run it under the smaller of LIMIT_S and what is left of TOTAL_S.
stage() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$((TOTAL_S - SECONDS - 5))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 10 ]; then
    echo "== $name: skipped, out of time" | tee -a "$summary"
    status=1
    return
  fi
  local start=$SECONDS
  echo "== $name (limit $limit s): $*"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  local verdict=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then verdict="timed out"; elif [ "$rc" != 0 ]; then verdict=FAILED; fi
  echo "== $name: $verdict (exit $rc) in $((SECONDS - start)) s" | tee -a "$summary"
  if [ "$rc" != 0 ]; then status=1; fi
}

# The CUDA tests: test functions whose decorators ask torch.cuda.is_available(), in test files that
# import neither ray nor pipeline (not installed there); one node id per line.
cuda_tests() {
  "$PYTHON" - <<'EOF'
import ast
import pathlib

for path in sorted(pathlib.Path("tests").glob("test_*.py")):
    tree = ast.parse(path.read_text(), filename=str(path))
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    if any(m.split(".")[0] in ("ray", "pipeline") for m in modules):
        continue
    for node in tree.body:
        functions = node.body if isinstance(node, ast.ClassDef) else [node]
        for fn in functions:
            if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test") and any(
                    "cuda.is_available" in ast.unparse(d) for d in fn.decorator_list):
                print(f"{path}::{node.name}::{fn.name}" if fn is not node else f"{path}::{fn.name}")
EOF
}

if [ "$SMOKE" = 1 ]; then
  stage gpu 120 "$OUT/gpu.log" "$PYTHON" bench/gpu.py --smoke --out "$OUT/gpu.json"
  if [ "${SMOKE_EXPERTS:-0}" = 1 ]; then  # ~30 s even at its smallest: left out of the smoke test
    stage experts 120 "$OUT/experts.log" "$PYTHON" bench/experts.py --device cpu --dim 256 --layers 1 --jobs 1
  else
    echo "== experts: skipped in --smoke (SMOKE_EXPERTS=1 runs it at dim 256, 1 block, 1 job: ~30 s)" | tee -a "$summary"
  fi
  stage lora 120 "$OUT/lora.log" "$PYTHON" bench/lora.py --smoke --out "$OUT/lora.json"
else
  if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device: run with --smoke on a CPU" | tee -a "$summary"
    exit 2
  fi
  mapfile -t tests < <(cuda_tests)
  if [ "${#tests[@]}" = 0 ]; then
    echo "== tests: FAILED, no CUDA tests found" | tee -a "$summary"
    status=1
  else
    echo "${#tests[@]} CUDA tests: ${tests[*]}" >>"$summary"
    stage tests 90 "$OUT/tests.log" "$PYTHON" -m pytest -q -rs -p no:cacheprovider "${tests[@]}"
  fi
  stage gpu 240 "$OUT/gpu.log" "$PYTHON" bench/gpu.py --out "$OUT/gpu.json"
  stage experts 150 "$OUT/experts.log" "$PYTHON" bench/experts.py --device cuda --dim 5120 --layers "$EXPERT_LAYERS"
  stage lora 90 "$OUT/lora.log" "$PYTHON" bench/lora.py --device cuda --out "$OUT/lora.json"
fi
echo "== all: $([ "$status" = 0 ] && echo ok || echo FAILED) in $SECONDS s" | tee -a "$summary"
exit "$status"
