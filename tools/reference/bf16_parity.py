"""kiln in bf16 against diffusers in bf16 on the same device, on the engine's FLUX.1 fixtures.

For each fixture (dev, schnell) both run the reference's prompt, size, steps and guidance from
the fixture's initial latents, in bf16 on `--device` (cpu or cuda:N); each one's final latents
are compared with the f32 CPU reference the fixture holds (diffusers' own run,
`*-reference.safetensors`). kiln's side is `kiln generate --model-dir ... --device D --precision
bf16 --dump-latents`, run by this script. Prints one JSON line per fixture: both errors and
their ratio.

    python3 tools/reference/bf16_parity.py --device cuda:0 --kiln path/to/kiln --out DIR
    python3 tools/reference/bf16_parity.py --device cpu --kiln target/release/kiln --out DIR

`--store` (CPU only) adds diffusers' bf16 final latents to each fixture's reference as
`final_latents_bf16_cpu`, and its bf16 VAE's decode of the f32 final latents as
`image_bf16_cpu`, which the engine's parity tests hold kiln's CPU bf16 run against (the tests
cannot run PyTorch).
"""

import argparse
import json
import subprocess
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from make_fixtures import add_to_reference

FIXTURES = Path(__file__).resolve().parents[2] / "crates/kiln-engine/tests/fixtures"


def diffusers_latents(config: str, ref: dict, device: str) -> torch.Tensor:
    """diffusers' bf16 run on `device`: final packed latents, f32 on the CPU."""
    # Not on the meta device: the fixture holds no VAE encoder, which diffusers then creates.
    pipe = FluxPipeline.from_pretrained(FIXTURES / f"{config}-diffusers", torch_dtype=torch.bfloat16,
                                        low_cpu_mem_usage=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    latents = load_file(FIXTURES / f"{config}-latents-in.safetensors")["latents"]
    kwargs = dict(guidance_scale=ref["guidance"]) if ref["guidance"] is not None else {}
    out = pipe(ref["prompt"], height=ref["height"], width=ref["width"], num_inference_steps=ref["steps"],
               max_sequence_length=ref["max_sequence_length"], latents=latents.to(device, torch.bfloat16),
               output_type="latent", **kwargs).images
    return out.float().cpu()


def diffusers_decode(config: str, ref: dict, final_latents: torch.Tensor) -> torch.Tensor:
    """diffusers' VAE in bf16 on the CPU decoding the f32 reference's final latents: the image as
    uint8 (height, width, 3), rounded as the reference's `image` is."""
    pipe = FluxPipeline.from_pretrained(FIXTURES / f"{config}-diffusers", torch_dtype=torch.bfloat16,
                                        low_cpu_mem_usage=False)
    latents = pipe._unpack_latents(final_latents, ref["height"], ref["width"], pipe.vae_scale_factor)
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    image = pipe.vae.decode(latents.to(torch.bfloat16), return_dict=False)[0]
    image = pipe.image_processor.postprocess(image.float(), output_type="np")[0]
    return torch.from_numpy((image * 255).round().astype(np.uint8))


def kiln_latents(kiln: str, config: str, ref: dict, out: Path, device: str) -> torch.Tensor:
    dump = out / f"{config}-kiln-latents.safetensors"
    cmd = [kiln, "generate", "--model-dir", str(FIXTURES / f"{config}-diffusers"), "--device", device,
           "--precision", "bf16", "--prompt", ref["prompt"], "--width", str(ref["width"]), "--height",
           str(ref["height"]), "--steps", str(ref["steps"]), "--latents",
           str(FIXTURES / f"{config}-latents-in.safetensors"), "--dump-latents", str(dump), "--output",
           str(out / f"{config}-kiln.png")]
    if ref["guidance"] is not None:
        cmd += ["--guidance", str(ref["guidance"])]
    subprocess.run(cmd, check=True)
    return load_file(dump)["latents"].float()


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--kiln", help="kiln's binary (without it, only diffusers runs)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--store", action="store_true", help="add diffusers' CPU bf16 latents to the fixtures")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.store and args.device != "cpu":
        p.error("--store keeps the CPU's bf16 run only")
    for config in ["dev", "schnell"]:
        ref = json.loads((FIXTURES / f"{config}-reference.json").read_text())
        want = load_file(FIXTURES / f"{config}-reference.safetensors")["final_latents"].float()
        with torch.inference_mode():
            theirs = diffusers_latents(config, ref, args.device)
        if args.store:
            with torch.inference_mode():
                image = diffusers_decode(config, ref, want)
            # PyTorch's bf16 kernels differ by CPU (oneDNN's AMX ones against AVX512-BF16's), so
            # the record names it.
            source = f"diffusers {diffusers.__version__}, torch {torch.__version__}, bf16 on the CPU ({cpu_model()})"
            add_to_reference(FIXTURES, config, {"final_latents_bf16_cpu": theirs.reshape(want.shape).contiguous(),
                                                "image_bf16_cpu": image.contiguous()},
                             {"final_latents_bf16_cpu": source,
                              "image_bf16_cpu": source + ": the VAE decoding final_latents"})
        if not args.kiln:
            print(json.dumps(dict(fixture=config, diffusers_bf16_error=(theirs.reshape(want.shape) - want)
                                  .abs().max().item())), flush=True)
            continue
        ours = kiln_latents(args.kiln, config, ref, args.out, args.device)
        err = lambda t: (t.reshape(want.shape) - want).abs().max().item()
        e_kiln, e_diffusers = err(ours), err(theirs)
        print(json.dumps(dict(fixture=config, scale=want.abs().max().item(), kiln_bf16_error=e_kiln,
                              diffusers_bf16_error=e_diffusers, ratio=e_kiln / max(e_diffusers, 1e-12),
                              kiln_vs_diffusers=(ours.reshape(want.shape) - theirs.reshape(want.shape)).abs()
                              .max().item())), flush=True)


if __name__ == "__main__":
    main()
