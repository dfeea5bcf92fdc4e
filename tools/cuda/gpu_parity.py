"""kiln on a GPU against diffusers on the same GPU, on the engine's FLUX.1 fixtures.

For each fixture (dev, schnell) both run the reference's prompt, size, steps and guidance from
the fixture's initial latents, in bf16 on the GPU; each one's final latents are compared with
the f32 CPU reference the fixture holds (diffusers' own run, `*-reference.safetensors`). kiln's
side is `kiln generate --model-dir ... --device cuda --precision bf16 --dump-latents`, run by
this script. Prints one JSON line per fixture: both errors and their ratio.

    python3 tools/cuda/gpu_parity.py --kiln path/to/kiln --out DIR
"""

import argparse
import json
import subprocess
from pathlib import Path

import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parents[2] / "crates/kiln-engine/tests/fixtures"


def diffusers_latents(config: str, ref: dict) -> torch.Tensor:
    """diffusers' bf16 run on the GPU: final packed latents, f32 on the CPU."""
    # Not on the meta device: the fixture holds no VAE encoder, which diffusers then creates.
    pipe = FluxPipeline.from_pretrained(FIXTURES / f"{config}-diffusers", torch_dtype=torch.bfloat16,
                                        low_cpu_mem_usage=False).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    latents = load_file(FIXTURES / f"{config}-latents-in.safetensors")["latents"]
    kwargs = dict(guidance_scale=ref["guidance"]) if ref["guidance"] is not None else {}
    out = pipe(ref["prompt"], height=ref["height"], width=ref["width"], num_inference_steps=ref["steps"],
               max_sequence_length=ref["max_sequence_length"], latents=latents.to("cuda", torch.bfloat16),
               output_type="latent", **kwargs).images
    return out.float().cpu()


def kiln_latents(kiln: str, config: str, ref: dict, out: Path) -> torch.Tensor:
    dump = out / f"{config}-kiln-latents.safetensors"
    cmd = [kiln, "generate", "--model-dir", str(FIXTURES / f"{config}-diffusers"), "--device", "cuda:0",
           "--precision", "bf16", "--prompt", ref["prompt"], "--width", str(ref["width"]), "--height",
           str(ref["height"]), "--steps", str(ref["steps"]), "--latents",
           str(FIXTURES / f"{config}-latents-in.safetensors"), "--dump-latents", str(dump), "--output",
           str(out / f"{config}-kiln.png")]
    if ref["guidance"] is not None:
        cmd += ["--guidance", str(ref["guidance"])]
    subprocess.run(cmd, check=True)
    return load_file(dump)["latents"].float()


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--kiln", required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for config in ["dev", "schnell"]:
        ref = json.loads((FIXTURES / f"{config}-reference.json").read_text())
        want = load_file(FIXTURES / f"{config}-reference.safetensors")["final_latents"].float()
        with torch.inference_mode():
            theirs = diffusers_latents(config, ref)
        ours = kiln_latents(args.kiln, config, ref, args.out)
        err = lambda t: (t.reshape(want.shape) - want).abs().max().item()
        e_kiln, e_diffusers = err(ours), err(theirs)
        print(json.dumps(dict(fixture=config, scale=want.abs().max().item(), kiln_bf16_error=e_kiln,
                              diffusers_bf16_error=e_diffusers, ratio=e_kiln / max(e_diffusers, 1e-12),
                              kiln_vs_diffusers=(ours.reshape(want.shape) - theirs.reshape(want.shape)).abs()
                              .max().item())), flush=True)


if __name__ == "__main__":
    main()
