#!/usr/bin/env bash
# Builds release `kiln` and `kiln-bench` with `--features cuda` on a machine with no GPU, driver
# or toolkit, for copying to a GPU machine (how this repository's H200 measurements were made;
# see BENCHMARKS.md, "CUDA").
#
# - The toolkit comes from NVIDIA's wheels (pip --target, never into the system), CUDA 13.0 by
#   default: candle loads most of its kernels as PTX, which a driver refuses when the compiler
#   was newer than the driver's CUDA version (nvidia-smi's "CUDA Version"; driver 580 is 13.0).
#   cuBLAS, cuRAND and NVRTC come too: the binary links them.
# - The link also wants the driver's libcuda.so, which only a driver installs: a stub with the
#   driver API's names (those cudarc binds) and the driver's soname stands in, and the real
#   libcuda.so.1 is what loads at run time.
# - Kernels are built for CUDA_COMPUTE_CAP (default 90: H100/H200).
#
#   tools/cuda/build-release.sh        # -> $CARGO_TARGET_DIR/release/{kiln,kiln-bench}
#
# Running needs libcudart, libcublas(Lt) and libcurand (the toolkit's or PyTorch's CUDA 13
# wheels, on LD_LIBRARY_PATH) and the driver. tools/cuda/device_run.sh is the run itself.
set -euo pipefail
cd "$(dirname "$0")/../.."

root="${KILN_CUDA_RELEASE_HOME:-$HOME/.cache/kiln/cuda-13.0-release}"
wheels=(
    "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88"
    "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" "nvidia-cublas==13.0.2.14"
    "nvidia-curand==10.4.0.35" "nvidia-cuda-nvrtc==13.0.88"
)
if [ "$(cat "$root/.kiln-cuda-wheels" 2>/dev/null)" != "${wheels[*]}" ]; then
    rm -rf "$root"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --target "$root" "${wheels[@]}"
    printf '%s' "${wheels[*]}" >"$root/.kiln-cuda-wheels"
fi
cuda="$root/nvidia/cu13"
ln -sfn lib "$cuda/lib64"

# Unversioned names for `-l...`, and the stub driver library.
link="$root/link"
mkdir -p "$link"
for l in cublas cublasLt cudart curand nvrtc; do
    ln -sfn "$(ls "$cuda"/lib/lib$l.so.* | grep -v -e builtins -e alt | head -n 1)" "$link/lib$l.so"
done
if [ ! -f "$link/libcuda.so" ]; then
    cargo fetch --locked >/dev/null
    sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10/src/driver/sys/mod.rs | head -n 1)
    grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$sys" | sed 's/pub unsafe fn //' | sort -u |
        awk '{print "void " $1 "(void) {}"}' >"$link/stub.c"
    cc -shared -fPIC -o "$link/libcuda.so" -Wl,-soname,libcuda.so.1 "$link/stub.c"
fi

export CUDA_HOME="$cuda" CUDA_PATH="$cuda" CUDA_ROOT="$cuda" PATH="$cuda/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" LIBRARY_PATH="$link${LIBRARY_PATH:+:$LIBRARY_PATH}"
cargo build --release --locked -p kiln -p kiln-bench --features kiln/cuda,kiln-bench/cuda
