"""Writes kiln-bench's random FLUX.1 checkpoint again in the files GGUF users run: the
transformer as a city96-style GGUF (BFL's tensor names; every 2-D weight whose rows are whole
blocks in Q8_0, the rest F32) and the VAE as BFL's `ae.safetensors` (latent-diffusion names,
decoder's weights with a seeded random encoder). kiln's GGUF path and stable-diffusion.cpp then read the very same file
(`kiln-bench gguf`, see README.md here).

    python tools/bench/write_gguf.py --work target/kiln-bench

Reads `WORK/transformer` and `WORK/vae` (written by kiln-bench) and writes `WORK/gguf/` once:
an existing complete folder is kept.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))
from make_fixtures import transformer_to_bfl, vae_to_ldm, write_gguf_q8  # noqa: E402

TRANSFORMER = "flux1-bench-Q8_0.gguf"
VAE = "ae.safetensors"


def random_encoder(config: dict) -> dict:
    """A seeded random encoder: stable-diffusion.cpp checks that a VAE file holds one, though
    a text-to-image run never uses it (kiln-bench's checkpoint holds the decoder only)."""
    torch.manual_seed(0)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    model = AutoencoderKL(**config)
    return {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    args = ap.parse_args()
    out = args.work / "gguf"
    if (out / TRANSFORMER).exists() and (out / VAE).exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((args.work / "transformer" / "config.json").read_text())
    sd = load_file(args.work / "transformer" / "diffusion_pytorch_model.safetensors")
    partial = out / (TRANSFORMER + ".partial")
    kinds = write_gguf_q8(transformer_to_bfl(sd, cfg), partial)
    vae = load_file(args.work / "vae" / "diffusion_pytorch_model.safetensors")
    vae_config = json.loads((args.work / "vae" / "config.json").read_text())
    vae.update(random_encoder(vae_config))
    levels = len(vae_config["block_out_channels"])
    ldm = {k: v.to(torch.float32).contiguous() for k, v in vae_to_ldm(vae, levels).items()}
    save_file(ldm, out / (VAE + ".partial"))
    # The names last, so a complete pair is never half written.
    (out / (VAE + ".partial")).rename(out / VAE)
    partial.rename(out / TRANSFORMER)
    q8 = sum(1 for k in kinds.values() if k == "Q8_0")
    print(f"wrote {out / TRANSFORMER} ({q8} Q8_0 tensors, {len(kinds) - q8} F32) and {out / VAE}")


if __name__ == "__main__":
    main()
