#!/usr/bin/env bash
# Compiles kiln with `--features cuda` on a machine without a GPU, a driver or a CUDA toolkit:
# `cargo check --workspace --all-targets --features cuda`, which runs the build scripts for real,
# so candle-kernels' build script compiles every CUDA kernel with nvcc and cudarc's reads the
# toolkit's version. Nothing is linked or run, so no libcuda.so (the driver's) is needed.
#
# Where no toolkit is present (no nvcc on PATH, none at $CUDA_HOME/bin or /usr/local/cuda/bin),
# the script assembles one from NVIDIA's wheels on PyPI, installed with `pip install --target`
# into $KILN_CUDA_HOME (default ~/.cache/kiln/cuda-<version>), never into the system. A second
# run finds it there and installs nothing. Cargo's own options pass through, e.g.
#   CARGO_TARGET_DIR=/tmp/target-cuda tools/cuda/check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

# The toolkit's version. cudarc 0.19.10 (candle 0.11's) reads it from `nvcc --version` and panics
# on one it has no bindings for; its newest is 13.4 (build.rs SUPPORTED_CUDA_VERSIONS), so 13.5's
# wheels would fail. The pins are those of NVIDIA's `cuda-toolkit==13.4.3` metapackage (its
# extras nvcc, nvvm, crt, cudart, cccl), exact so that CI installs the same files every time.
# The 12.x wheels cannot serve: nvidia-cuda-nvcc-cu12 ships ptxas and headers but no nvcc.
CUDA_WHEELS_VERSION=13.4.92
CUDA_WHEELS=(
    "nvidia-cuda-nvcc==13.4.92"     # bin/nvcc, ptxas, fatbinary, nvlink, bin/nvcc.profile
    "nvidia-nvvm==13.4.92"          # nvvm/bin/cicc and nvvm/libdevice, which nvcc runs and reads
    "nvidia-cuda-crt==13.4.92"      # include/crt: host_config.h and the rest nvcc's front end includes
    "nvidia-cuda-runtime==13.4.92"  # include/cuda_runtime.h, cuda.h, cuda_fp16/bf16/fp8.h; lib/libcudart
    "nvidia-cuda-cccl==13.3.4.3.1"  # include/cccl: thrust, cub, cuda/std (candle's sort and MoE kernels)
)
# Not installed: cuBLAS, cuRAND and NVRTC. The kernels include none of their headers and `cargo
# check` links nothing, so they would only cost download time (cuBLAS alone is ~600 MB).

# candle-kernels' build script (through cudaforge) asks nvidia-smi for the GPU's compute capability
# and fails without one; CUDA_COMPUTE_CAP stands in for it. 90 is Hopper (H100/H200): cudaforge
# turns it into sm_90a, the architecture kiln's GPU deployments run on. Any other value works too.
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

# A toolkit is present when nvcc is on PATH or where cudaforge and cudarc look for one.
find_system_nvcc() {
    if command -v nvcc >/dev/null 2>&1; then
        command -v nvcc
        return 0
    fi
    local root
    for root in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda /opt/cuda; do
        if [ -n "$root" ] && [ -x "$root/bin/nvcc" ]; then
            echo "$root/bin/nvcc"
            return 0
        fi
    done
    return 1
}

if nvcc_path="$(find_system_nvcc)"; then
    cuda_root="$(cd "$(dirname "$nvcc_path")/.." && pwd)"
    export PATH="$cuda_root/bin:$PATH"
    echo "tools/cuda/check.sh: using the CUDA toolkit at $cuda_root" >&2
else
    install_dir="${KILN_CUDA_HOME:-$HOME/.cache/kiln/cuda-$CUDA_WHEELS_VERSION}"
    # All CUDA 13 wheels unpack into one tree, nvidia/cu13, already laid out as a toolkit: bin/nvcc
    # with an nvcc.profile that points at ../nvvm/bin (cicc), ../nvvm/libdevice, ../include and
    # ../include/cccl, and libraries in ../lib.
    cuda_root="$install_dir/nvidia/cu13"
    # The list of wheels, written last, marks a complete install of exactly these pins.
    stamp="$install_dir/.kiln-cuda-wheels"
    if [ "$(cat "$stamp" 2>/dev/null)" != "${CUDA_WHEELS[*]}" ]; then
        if ! python3 -m pip --version >/dev/null 2>&1; then
            echo "tools/cuda/check.sh: no CUDA toolkit and no pip to install one from NVIDIA's wheels (install python3-pip, or a CUDA $CUDA_WHEELS_VERSION toolkit)" >&2
            exit 1
        fi
        echo "tools/cuda/check.sh: installing CUDA $CUDA_WHEELS_VERSION from NVIDIA's wheels into $install_dir" >&2
        # Into a fresh directory beside the final one, moved into place only when pip succeeded, so
        # that an interrupted install is never taken for a complete one. --target installs outside
        # any Python environment (no root, allowed on an externally managed Python); --no-deps
        # because the pins are the complete set; --no-cache-dir because the files are kept here.
        mkdir -p "$(dirname "$install_dir")"
        staging="$(mktemp -d "$install_dir.partial.XXXXXX")"
        chmod 755 "$staging"
        trap 'rm -rf "$staging"' EXIT
        PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
            --no-cache-dir --no-deps --only-binary=:all: --target "$staging" "${CUDA_WHEELS[@]}"
        printf '%s' "${CUDA_WHEELS[*]}" >"$staging/.kiln-cuda-wheels"
        rm -rf "$install_dir"
        mv "$staging" "$install_dir"
        trap - EXIT
    fi
    # What the wheels' tree lacks of a toolkit's layout: lib64 (cudaforge and other tools derive
    # <root>/lib64 from nvcc's location) and the unversioned libcudart.so that `-lcudart` wants
    # (the wheels ship only the soname). Recreated every run; cheap, and it repairs a copied tree.
    ln -sfn lib "$cuda_root/lib64"
    ln -sfn libcudart.so.13 "$cuda_root/lib/libcudart.so"
    export PATH="$cuda_root/bin:$PATH"
fi

# cudaforge finds nvcc on PATH (or $NVCC); cudarc's build script runs `nvcc --version` and takes
# its library search paths from these variables. All three point at the one root.
export CUDA_HOME="$cuda_root" CUDA_PATH="$cuda_root" CUDA_ROOT="$cuda_root"
nvcc --version | tail -n 2 >&2

cargo check --workspace --all-targets --features cuda --locked
