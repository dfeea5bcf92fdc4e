#!/usr/bin/env bash
# Builds stable-diffusion.cpp's `sd-cli` beside kiln, for `kiln-bench gguf` (see README.md here).
#
#   git clone --recursive https://github.com/leejet/stable-diffusion.cpp /tmp/sdcpp
#   tools/bench/build_sdcpp.sh /tmp/sdcpp
#   export KILN_BENCH_SDCPP=/tmp/sdcpp/build/bin/sd-cli
#
# Two changes to its FLUX.1 text conditioning, so that it runs the benchmark's shapes with no
# text encoder (the benchmark times the transformer; kiln-bench's random checkpoint has none):
# - 512 text tokens per chunk, as kiln-bench and diffusers run (FLUX.1 [dev]'s T5 length), in
#   place of its 256;
# - one chunk of zero conditioning when neither CLIP nor T5 is given (it computes none at all
#   otherwise).
# Nothing else is changed; ggml is built for this CPU (GGML_NATIVE, which takes AMX and
# AVX512-BF16 where the CPU has them).
set -euo pipefail
src=${1:?usage: build_sdcpp.sh STABLE_DIFFUSION_CPP_CHECKOUT}
python3 - "$src/src/conditioning/conditioner.hpp" <<'EOF'
import sys
path = sys.argv[1]
s = open(path).read()
start = s.index("struct FluxCLIPEmbedder")
end = s.index("\nstruct ", start + 1)
block = s[start:end]
edits = [
    ("size_t chunk_len = 256;", "size_t chunk_len = 512;"),
    ("size_t chunk_count = std::max(clip_l_tokens.size() > 0 ? chunk_len : 0, t5_tokens.size()) / chunk_len;",
     "size_t chunk_count = std::max<size_t>(1, std::max(clip_l_tokens.size() > 0 ? chunk_len : 0, t5_tokens.size()) / chunk_len);"),
]
for old, new in edits:
    if new in block:
        continue
    if block.count(old) != 1:
        sys.exit(f"build_sdcpp.sh: this stable-diffusion.cpp differs from the one the script knows ({old!r})")
    block = block.replace(old, new)
open(path, "w").write(s[:start] + block + s[end:])
EOF
cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DSD_WEBP=OFF -DSD_WEBM=OFF -DGGML_NATIVE=ON
cmake --build "$src/build" --config Release -j"$(nproc)" --target sd-cli
echo "built $src/build/bin/sd-cli"
