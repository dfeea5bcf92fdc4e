#!/usr/bin/env bash
# What this session ran on the lent GPU machine (device tool): the CUDA build of kiln and
# kiln-bench (carried xz-compressed in .gpu/, built by tools/cuda's toolkit from NVIDIA's CUDA 13.0 wheels),
# diffusers carried as wheels in .whl/. Results go to $OUT.
set -x
mkdir -p /tmp/bin
for b in kiln kiln-bench; do
    python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
        ".gpu/$b.xz" "/tmp/bin/$b" && chmod +x "/tmp/bin/$b" || exit 1
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
# cuBLAS, cuRAND, NVRTC and the CUDA runtime from PyTorch's CUDA 13 wheels; libcuda from the driver.
nv=$(python3 -c 'import nvidia; print(nvidia.__path__[0])')
libs=$(dirname "$(find "$nv" -name 'libcublas.so.13' | head -1)")
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
ldd /tmp/bin/kiln | grep -E 'not found|cuda|cublas|curand|nvrtc'
python3 -c 'import torch, diffusers; print(torch.__version__, diffusers.__version__)'
PYTHONUNBUFFERED=1 timeout 200 python3 tools/reference/bf16_parity.py --device cuda:0 --kiln /tmp/bin/kiln --out "$OUT/parity" 2>&1 | tee "$OUT/parity.log" | tail -20
timeout 300 /tmp/bin/kiln-bench --work /tmp/kb --device cuda:0 --precision bf16 --python python3 --runs 5 \
    --only transformer-512 --only transformer-1024 --only vae-decode-1024 --only generation-1024 \
    --markdown "$OUT/bench.md" 2>&1 | tee "$OUT/bench.log" | tail -40
