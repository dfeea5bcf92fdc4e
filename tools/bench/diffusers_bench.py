"""The diffusers (PyTorch) side of kiln's benchmark: one workload in this process, timed, with
its peak memory, printed as one JSON line (kiln-bench's `Measurement`). kiln-bench runs it;
see README.md in this folder.

The transformer and VAE workloads load the random checkpoint kiln-bench wrote (the same weights
and inputs kiln runs) and save their output for kiln-bench to compare.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file, save_file

TEXT_TOKENS = 512
DEMO_PROMPT = "a red circle in the top left on a blue background"


def reset_peak_memory():
    Path("/proc/self/clear_refs").write_text("5")


def peak_memory():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# Where and in what the workloads run (`--device`, `--dtype`): the CPU in f32 unless told.
DEVICE = torch.device("cpu")
DTYPE = torch.float32
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def load_transformer(work: Path):
    return FluxTransformer2DModel.from_pretrained(work / "transformer", torch_dtype=torch.float32).eval().to(
        DEVICE, DTYPE)


def load_decoder(work: Path):
    """The VAE from its config, with the decoder's weights (the file holds nothing else)."""
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(work / "vae")).eval()
    missing, unexpected = vae.load_state_dict(load_file(work / "vae" / "diffusion_pytorch_model.safetensors"),
                                              strict=False)
    not_loaded = [k for k in missing if not k.startswith(("encoder.", "quant_conv"))]
    if not_loaded or unexpected:
        raise SystemExit(f"the benchmark VAE does not match diffusers': missing {not_loaded}, unexpected {unexpected}")
    return vae.to(DEVICE, DTYPE)


def transformer_call(transformer, inputs, side):
    grid = side // 16
    img_ids = FluxPipeline._prepare_latent_image_ids(1, grid, grid, DEVICE, torch.float32)
    txt_ids = torch.zeros(TEXT_TOKENS, 3, device=DEVICE)
    p = f"transformer_{side}"
    scalar = lambda v: torch.tensor([v], device=DEVICE, dtype=DTYPE)
    return lambda: transformer(hidden_states=inputs[f"{p}.img"], encoder_hidden_states=inputs[f"{p}.txt"],
                               pooled_projections=inputs[f"{p}.pooled"], timestep=scalar(0.5),
                               guidance=scalar(3.5), img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]


def decode(vae, z):
    return vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample


def workload(name: str, work: Path, demo: Path):
    """(the call to time, whether its output is saved for comparison)."""
    inputs = load_file(work / "inputs.safetensors") if name != "demo-generation" else {}
    inputs = {k: v.to(DEVICE, DTYPE) for k, v in inputs.items()}
    if name == "matmul-4096":
        a, b = (torch.randn(4096, 4096).to(DEVICE, DTYPE) for _ in range(2))
        return lambda: a @ b, False
    if name in ("transformer-512", "transformer-1024"):
        return transformer_call(load_transformer(work), inputs, int(name.split("-")[1])), True
    if name == "vae-decode-1024":
        vae = load_decoder(work)
        return lambda: decode(vae, inputs["latents_1024"]), True
    if name == "generation-1024":
        call, vae = transformer_call(load_transformer(work), inputs, 1024), load_decoder(work)
        return lambda: decode(vae, FluxPipeline._unpack_latents(call(), 1024, 1024, 8)), True
    if name == "demo-generation":
        pipe = FluxPipeline.from_pretrained(demo, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        kiln = json.loads((demo / "model_index.json").read_text())["_kiln"]
        return lambda: pipe(DEMO_PROMPT, negative_prompt="", true_cfg_scale=kiln["true_cfg_scale"], height=64,
                            width=64, num_inference_steps=kiln["steps"], generator=torch.Generator().manual_seed(0),
                            output_type="pt").images, False
    raise SystemExit(f"unknown workload {name}")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("workload")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--demo", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    args = p.parse_args()
    global DEVICE, DTYPE
    DEVICE, DTYPE = torch.device(args.device), DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        run, comparable = workload(args.workload, args.work, args.demo)
        reset_peak_memory()
        run()
        sync()
        seconds = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            out = run()
            sync()  # a GPU's work is queued: the time is until it is done
            seconds.append(time.perf_counter() - t0)
        peak = peak_memory()
        if comparable:
            path = args.work / "outputs" / "diffusers" / f"{args.workload}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"output": out.float().cpu().contiguous()}, path)
    print(json.dumps(dict(seconds=seconds, flops=None, peak_bytes=peak, threads=torch.get_num_threads())))


if __name__ == "__main__":
    main()
