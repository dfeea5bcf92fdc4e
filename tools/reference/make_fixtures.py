"""Builds tiny random FLUX.1 pipelines with diffusers, saves them in the layouts kiln-engine
loads (diffusers folder, BFL single files, GGUF Q8_0) and runs diffusers' FluxPipeline on them
to record reference outputs. See README.md in this folder for how to run it.

Two configurations: "dev" (guidance embedding, dynamic shift, T5 length 512, CLIP config with
the legacy eos_token_id 2) and "schnell" (no guidance embedding, no shift, T5 length 256, CLIP
config with the real end-of-text id). Weights are rounded to bf16 and stored as bf16 so every
layout holds exactly the numbers the reference ran with. The VAE's encoder is dropped from the
saved files (the engine decodes only) to keep the fixtures small.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from flux_parts import (CLIP_BOS, CLIP_EOS, save_bf16, save_t5_tokenizer, train_clip_bpe, train_t5_unigram,  # noqa: E402
                        write_clip_tokenizer_config, write_model_index)

PROMPT = "A red fox sleeping in the snow, soft watercolor painting"
# A checkpoint trained for it (kiln's demo) is sampled with true classifier-free guidance
# against the empty prompt; the reference run with it uses this scale.
TRUE_CFG_SCALE = 2.5

CORPUS = [
    "a red fox sleeping in the snow",
    "soft watercolor painting of a mountain lake at dawn",
    "a photograph of a cat sitting on a wooden chair",
    "an astronaut riding a horse on the moon, digital art",
    "close-up portrait of an old fisherman, dramatic light",
    "a bowl of ramen with eggs and green onions",
    "city street at night in the rain, neon signs, reflections",
    "a small cabin in a pine forest covered with snow",
    "sunflowers in a blue vase on a kitchen table",
    "a lighthouse on a rocky coast during a storm",
    "watercolor sketch of a sleeping dog by the fire",
    "the quick brown fox jumps over the lazy dog",
] * 4

CONFIGS = {
    "dev": dict(
        guidance=True,
        transformer=dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=4),
        vae_blocks=[32, 32],
        width=40,
        height=24,
        steps=28,
        guidance_scale=3.5,
        max_sequence_length=512,
        clip_legacy_eos=True,
        clip_text_model_prefix=True,
        scheduler=dict(use_dynamic_shifting=True, shift=3.0, base_shift=0.5, max_shift=1.15,
                       base_image_seq_len=256, max_image_seq_len=4096),
    ),
    "schnell": dict(
        guidance=False,
        transformer=dict(num_layers=2, num_single_layers=1, attention_head_dim=16, num_attention_heads=2),
        vae_blocks=[32, 32, 32],
        width=32,
        height=48,
        steps=4,
        guidance_scale=None,
        max_sequence_length=256,
        clip_legacy_eos=False,
        clip_text_model_prefix=False,
        scheduler=dict(use_dynamic_shifting=False, shift=1.0),
    ),
}

TEXT_DIM = 32


def bytes_to_unicode():
    """CLIP's (GPT-2's) byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def make_clip_tokenizer(out: Path):
    """A CLIP-style BPE tokenizer trained on the corpus, saved as vocab.json + merges.txt (no
    tokenizer.json), laid out as CLIP's: bytes, bytes + </w>, merges, then the two specials."""
    tok = train_clip_bpe(CORPUS, 700)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, list) else m.split(" ") for m in merges]
    base = bytes_to_unicode()
    vocab = {}
    for t in base + [b + "</w>" for b in base]:
        vocab.setdefault(t, len(vocab))
    kept = []
    for a, b in merges:
        if a in vocab and b in vocab and a + b not in vocab:
            vocab[a + b] = len(vocab)
            kept.append((a, b))
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept))
    write_clip_tokenizer_config(out)
    return len(vocab), vocab["<|endoftext|>"]


def make_t5_tokenizer(out: Path):
    """A T5-style unigram tokenizer.json (Metaspace, "$A </s>"), as T5TokenizerFast saves."""
    tok = train_t5_unigram(CORPUS, 150)
    save_t5_tokenizer(tok, out)
    return tok.get_vocab_size()


def round_bf16_(module: torch.nn.Module, seed: int):
    """Perturbs norms and biases (so mapping mistakes show) and rounds every weight to bf16."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


# --- diffusers -> BFL names (the inverse of diffusers' single-file conversion) ---------------

def transformer_to_bfl(sd: dict, cfg: dict) -> dict:
    hidden = cfg["attention_head_dim"] * cfg["num_attention_heads"]
    out = {}
    fixed = {
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "context_embedder": "txt_in",
        "x_embedder": "img_in",
        "proj_out": "final_layer.linear",
    }
    for k, v in fixed.items():
        for s in ("weight", "bias"):
            if f"{k}.{s}" in sd:
                out[f"{v}.{s}"] = sd[f"{k}.{s}"]
    for s in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{s}"].chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{s}"] = torch.cat([shift, scale], dim=0)
    for i in range(cfg["num_layers"]):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for s in ("weight", "bias"):
            out[f"{b}.img_mod.lin.{s}"] = sd[f"{d}.norm1.linear.{s}"]
            out[f"{b}.txt_mod.lin.{s}"] = sd[f"{d}.norm1_context.linear.{s}"]
            out[f"{b}.img_attn.qkv.{s}"] = torch.cat([sd[f"{d}.attn.to_{x}.{s}"] for x in "qkv"])
            out[f"{b}.txt_attn.qkv.{s}"] = torch.cat([sd[f"{d}.attn.add_{x}_proj.{s}"] for x in "qkv"])
            out[f"{b}.img_attn.proj.{s}"] = sd[f"{d}.attn.to_out.0.{s}"]
            out[f"{b}.txt_attn.proj.{s}"] = sd[f"{d}.attn.to_add_out.{s}"]
            out[f"{b}.img_mlp.0.{s}"] = sd[f"{d}.ff.net.0.proj.{s}"]
            out[f"{b}.img_mlp.2.{s}"] = sd[f"{d}.ff.net.2.{s}"]
            out[f"{b}.txt_mlp.0.{s}"] = sd[f"{d}.ff_context.net.0.proj.{s}"]
            out[f"{b}.txt_mlp.2.{s}"] = sd[f"{d}.ff_context.net.2.{s}"]
        out[f"{b}.img_attn.norm.query_norm.scale"] = sd[f"{d}.attn.norm_q.weight"]
        out[f"{b}.img_attn.norm.key_norm.scale"] = sd[f"{d}.attn.norm_k.weight"]
        out[f"{b}.txt_attn.norm.query_norm.scale"] = sd[f"{d}.attn.norm_added_q.weight"]
        out[f"{b}.txt_attn.norm.key_norm.scale"] = sd[f"{d}.attn.norm_added_k.weight"]
    for i in range(cfg["num_single_layers"]):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for s in ("weight", "bias"):
            out[f"{b}.modulation.lin.{s}"] = sd[f"{d}.norm.linear.{s}"]
            out[f"{b}.linear1.{s}"] = torch.cat([sd[f"{d}.attn.to_{x}.{s}"] for x in "qkv"] + [sd[f"{d}.proj_mlp.{s}"]])
            out[f"{b}.linear2.{s}"] = sd[f"{d}.proj_out.{s}"]
        out[f"{b}.norm.query_norm.scale"] = sd[f"{d}.attn.norm_q.weight"]
        out[f"{b}.norm.key_norm.scale"] = sd[f"{d}.attn.norm_k.weight"]
    return out


def vae_to_ldm(sd: dict, levels: int) -> dict:
    """diffusers AutoencoderKL names -> latent-diffusion names (BFL's ae.safetensors)."""
    def resnet(s):
        return s.replace("conv_shortcut", "nin_shortcut")

    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        coder = parts[0]
        if k.startswith(f"{coder}.mid_block.resnets."):
            j = int(parts[3])
            n = f"{coder}.mid.block_{j + 1}." + resnet(".".join(parts[4:]))
        elif k.startswith(f"{coder}.mid_block.attentions.0."):
            stem, s = ".".join(parts[4:-1]), parts[-1]
            to = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[stem]
            n = f"{coder}.mid.attn_1.{to}.{s}"
            if to != "norm" and s == "weight":
                v = v[:, :, None, None]
        elif k.startswith("decoder.up_blocks."):
            i = int(parts[2])
            level = levels - 1 - i
            if parts[3] == "resnets":
                n = f"decoder.up.{level}.block.{parts[4]}." + resnet(".".join(parts[5:]))
            else:
                n = f"decoder.up.{level}.upsample." + ".".join(parts[5:])
        elif k.startswith("encoder.down_blocks."):
            i = parts[2]
            if parts[3] == "resnets":
                n = f"encoder.down.{i}.block.{parts[4]}." + resnet(".".join(parts[5:]))
            else:
                n = f"encoder.down.{i}.downsample." + ".".join(parts[5:])
        elif parts[1] == "conv_norm_out":
            n = f"{coder}.norm_out.{parts[2]}"
        else:
            n = k
        out[n] = v
    return out


def diffusers_flux_conversion(inner_dim: int):
    """diffusers' `convert_flux_transformer_checkpoint_to_diffusers` with its hard-coded 3072
    replaced by the tiny model's width (the function is otherwise used unchanged)."""
    import inspect
    import diffusers.loaders.single_file_utils as sfu

    src = inspect.getsource(convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in src
    namespace = dict(vars(sfu))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def write_gguf_q8(bfl: dict, path: Path):
    """A city96-style GGUF: 2-D weights whose rows are whole Q8_0 blocks quantized, the rest F32."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch="flux")
    kinds = {}
    for name, t in bfl.items():
        a = t.to(torch.float32).numpy()
        if a.ndim == 2 and a.shape[1] % 32 == 0:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            kinds[name] = "Q8_0"
        else:
            w.add_tensor(name, a)
            kinds[name] = "F32"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return kinds


def build(name: str, cfg: dict, out_root: Path):
    torch.manual_seed({"dev": 1, "schnell": 2}[name])
    root = out_root / f"{name}-diffusers"
    if root.exists():
        shutil.rmtree(root)
    clip_vocab, eot = make_clip_tokenizer(root / "tokenizer")
    t5_vocab = make_t5_tokenizer(root / "tokenizer_2")

    clip_cfg = CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=eot - 1, eos_token_id=2 if cfg["clip_legacy_eos"] else eot, pad_token_id=eot, projection_dim=TEXT_DIM,
    )
    clip = CLIPTextModel(clip_cfg).eval()
    t5 = T5EncoderModel(T5Config(
        vocab_size=t5_vocab, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False,
    )).eval()
    tcfg = dict(patch_size=1, in_channels=64, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
                guidance_embeds=cfg["guidance"], axes_dims_rope=[4, 6, 6], **cfg["transformer"])
    transformer = FluxTransformer2DModel(**tcfg).eval()
    levels = len(cfg["vae_blocks"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels, block_out_channels=cfg["vae_blocks"], layers_per_block=1,
        latent_channels=16, norm_num_groups=32, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    ).eval()
    for i, m in enumerate([clip, t5, transformer, vae]):
        round_bf16_(m, 100 + i)
    scheduler = FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])

    # diffusers layout (the VAE's encoder left out of the saved file).
    clip.save_pretrained(root / "text_encoder")
    t5.save_pretrained(root / "text_encoder_2")
    for d in ("text_encoder", "text_encoder_2"):
        f = root / d / "model.safetensors"
        sd = load_file(str(f))
        if d == "text_encoder" and cfg["clip_text_model_prefix"]:
            # transformers 4 (what FLUX.1's repositories were saved with) wrote CLIPTextModel's
            # tensors under `text_model.`; transformers 5 writes them bare. Cover both.
            sd = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}
        save_bf16(sd, f)
    transformer.save_pretrained(root / "transformer")
    save_bf16(transformer.state_dict(), root / "transformer" / "diffusion_pytorch_model.safetensors")
    vae.save_pretrained(root / "vae")
    vae_sd = vae.state_dict()
    save_bf16({k: v for k, v in vae_sd.items() if k.startswith("decoder.")}, root / "vae" / "diffusion_pytorch_model.safetensors")
    scheduler.save_pretrained(root / "scheduler")
    write_model_index(root)

    # BFL single files, checked against diffusers' own conversion back.
    bfl = transformer_to_bfl(transformer.state_dict(), tcfg)
    back = diffusers_flux_conversion(tcfg["attention_head_dim"] * tcfg["num_attention_heads"])(dict(bfl))
    ref = transformer.state_dict()
    assert set(back) == set(ref), set(back) ^ set(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref), "BFL mapping does not round-trip"
    ldm = vae_to_ldm(vae_sd, levels)
    back = convert_ldm_vae_checkpoint(dict(ldm), dict(vae.config))
    assert all(torch.equal(back[k].reshape(vae_sd[k].shape), vae_sd[k]) for k in vae_sd), "VAE mapping does not round-trip"
    bfl_dir = out_root / f"{name}-bfl"
    if bfl_dir.exists():
        shutil.rmtree(bfl_dir)
    save_bf16(bfl, bfl_dir / f"flux1-tiny-{name}.safetensors")
    save_bf16({k: v for k, v in ldm.items() if k.startswith("decoder.")}, bfl_dir / "ae.safetensors")
    gguf_dir = out_root / f"{name}-gguf"
    if gguf_dir.exists():
        shutil.rmtree(gguf_dir)
    gguf_dir.mkdir()
    kinds = write_gguf_q8(bfl, gguf_dir / f"flux1-tiny-{name}-Q8_0.gguf")

    # The reference run, through the tokenizers and models as loaded from the saved folders.
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder_2=t5, tokenizer_2=T5TokenizerFast.from_pretrained(root / "tokenizer_2"), transformer=transformer,
    )
    w, h = cfg["width"], cfg["height"]
    lat_h, lat_w = 2 * (h // (pipe.vae_scale_factor * 2)), 2 * (w // (pipe.vae_scale_factor * 2))
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn((1, 16, lat_h, lat_w), generator=g)
    latents = FluxPipeline._pack_latents(noise, 1, 16, lat_h, lat_w)

    clip_ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    t5_ids = pipe.tokenizer_2(PROMPT, padding="max_length", max_length=cfg["max_sequence_length"], truncation=True,
                              return_tensors="pt").input_ids
    calls = []
    hook = transformer.register_forward_hook(lambda m, args, kwargs, out: calls.append((kwargs, out[0].detach().clone())), with_kwargs=True)
    common = dict(prompt=PROMPT, width=w, height=h, num_inference_steps=cfg["steps"], latents=latents.clone(),
                  max_sequence_length=cfg["max_sequence_length"])
    if cfg["guidance_scale"] is not None:
        common["guidance_scale"] = cfg["guidance_scale"]
    with torch.no_grad():
        final = pipe(**common, output_type="latent").images
        first_kwargs, noise_pred_0 = calls[0]
        hook.remove()
        image = pipe(**common, output_type="np").images[0]
        prompt_embeds, pooled, _ = pipe.encode_prompt(PROMPT, None, max_sequence_length=cfg["max_sequence_length"])
    image_u8 = torch.from_numpy((image * 255).round().astype(np.uint8))
    sigma0 = float(first_kwargs["timestep"][0])
    save_file({
        "latents_in": latents.contiguous(),
        "clip_ids": clip_ids[0].to(torch.int64).contiguous(),
        "t5_ids": t5_ids[0].to(torch.int64).contiguous(),
        "pooled": pooled.contiguous(),
        "t5": prompt_embeds.contiguous(),
        "noise_pred_0": noise_pred_0.contiguous(),
        "final_latents": final.contiguous(),
        "image": image_u8.contiguous(),
    }, str(out_root / f"{name}-reference.safetensors"))
    save_file({"latents": latents.contiguous()}, str(out_root / f"{name}-latents-in.safetensors"))
    (out_root / f"{name}-reference.json").write_text(json.dumps({
        "prompt": PROMPT, "width": w, "height": h, "steps": cfg["steps"], "guidance": cfg["guidance_scale"],
        "max_sequence_length": cfg["max_sequence_length"], "first_timestep": sigma0,
        "sigmas": pipe.scheduler.sigmas.tolist(), "gguf_types": sorted(set(kinds.values())),
    }, indent=1))
    print(f"{name}: image {w}x{h}, {cfg['steps']} steps, |noise_pred_0| max {noise_pred_0.abs().max():.3f}, "
          f"|final| max {final.abs().max():.3f}")
    add_true_cfg_reference(name, out_root)


def add_to_reference(out_root: Path, name: str, tensors: dict, meta: dict):
    """Adds `tensors` and `meta` entries to the fixtures' `{name}-reference.safetensors|json`."""
    path = out_root / f"{name}-reference.safetensors"
    saved = load_file(str(path))
    saved.update(tensors)
    save_file(saved, str(path))
    path = out_root / f"{name}-reference.json"
    saved = json.loads(path.read_text())
    saved.update(meta)
    path.write_text(json.dumps(saved, indent=1))


def add_true_cfg_reference(name: str, out_root: Path):
    """The final latents of the reference run again with true classifier-free guidance against
    the empty prompt, from the saved diffusers folder, added to `{name}-reference.*`."""
    root = out_root / f"{name}-diffusers"
    pipe = FluxPipeline.from_pretrained(str(root), torch_dtype=torch.float32)
    meta = json.loads((out_root / f"{name}-reference.json").read_text())
    tensors = load_file(str(out_root / f"{name}-reference.safetensors"))
    extra = dict(guidance_scale=meta["guidance"]) if meta["guidance"] is not None else {}
    with torch.no_grad():
        final = pipe(prompt=meta["prompt"], width=meta["width"], height=meta["height"],
                     num_inference_steps=meta["steps"], latents=tensors["latents_in"].clone(),
                     max_sequence_length=meta["max_sequence_length"], true_cfg_scale=TRUE_CFG_SCALE,
                     negative_prompt="", output_type="latent", **extra).images
    add_to_reference(out_root, name, {"final_latents_true_cfg": final.contiguous()},
                     {"true_cfg_scale": TRUE_CFG_SCALE})
    print(f"{name}: true CFG {TRUE_CFG_SCALE}, |final| max {final.abs().max():.3f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "crates/kiln-engine/tests/fixtures"))
    p.add_argument("--only-true-cfg", action="store_true",
                   help="only add the true-CFG reference runs to the fixtures already in --out")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    for name, cfg in CONFIGS.items():
        if args.only_true_cfg:
            add_true_cfg_reference(name, out)
        else:
            build(name, cfg, out)


if __name__ == "__main__":
    main()
