"""Builds a tiny random klein-like FLUX.2 pipeline with diffusers (Flux2Transformer2DModel,
AutoencoderKLFlux2, a Qwen3 text model with a byte-level BPE tokenizer trained on the caption
corpus and a Qwen3-style chat template), saves it in the diffusers layout and runs diffusers'
Flux2KleinPipeline on it with fixed initial latents to record reference outputs. See README.md
in this folder for how to run it.

The shapes follow FLUX.2 klein at a tiny width: 32 latent channels patchified to 128, a
distilled transformer (no guidance embedding), Qwen3 hidden states of three layers stacked. The
reference layers are (1, 2, 3) of a 4-layer Qwen3 so that, as with klein's (9, 18, 27) of 36,
none of them is the final-norm output. Weights are rounded to bf16 and stored as bf16. The VAE's
encoder is dropped from the saved files (the engine decodes only so far).
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from diffusers import Flux2Pipeline
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers, convert_ldm_vae_checkpoint
from diffusers.pipelines.flux2.pipeline_flux2 import format_input
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE, SYSTEM_MESSAGE_UPSAMPLING_T2I
from transformers import (Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig,
                          PreTrainedTokenizerFast, Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM)

from make_fixtures import CORPUS, PROMPT, add_to_reference, round_bf16_, save_bf16

# Qwen3's chat template, reduced to what a prompt encoder and a prompt rewriter use: system,
# user and assistant turns, the generation prompt and the `enable_thinking=False` empty think
# block. For one user turn it renders exactly what Qwen3's full template renders.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# Mistral Small 3.x's template for text turns (content as a list of text parts, as diffusers'
# `format_input` writes them): `<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]`.
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- text + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]

# Qwen2's pre-tokenizer split (contractions, letters, single digits, punctuation, newlines).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

TEXT_LAYERS = 4
OUT_LAYERS = (1, 2, 3)
TEXT_DIM = 32
MAX_SEQUENCE_LENGTH = 512
WIDTH, HEIGHT, STEPS = 32, 48, 4
# The same weights run as the undistilled base: true classifier-free guidance against "".
BASE_STEPS, BASE_GUIDANCE = 3, 4.0
# The reference image klein edits: another size than the output (diffusers takes none under
# 64 pixels), so its token grid differs.
REF_WIDTH, REF_HEIGHT = 72, 64
# dev's embedded guidance (the reference pipeline's default).
DEV_GUIDANCE = 4.0
# Prompt expansion compared token for token: greedy, this many new tokens at most (the
# reference's 512 would only make the test slower).
EXPANSION_TOKENS = 48


def train_bpe_tokenizer(out: Path, specials: list, extra: list, config: dict):
    """A byte-level BPE with Qwen2's pre-tokenizer split (Mistral's Tekken is byte-level BPE
    too) trained on the corpus, saved as `tokenizer.json` + `tokenizer_config.json`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS + extra, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 131072, "padding_side": "right", **config},
                                                          indent=1))


def make_qwen_tokenizer(out: Path) -> Qwen2TokenizerFast:
    """A Qwen2-style tokenizer (no BOS, `<|endoftext|>` pads) with the chat template."""
    train_bpe_tokenizer(out, SPECIALS, ["user\nassistant\n"], {
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "unk_token": None, "add_bos_token": False, "chat_template": CHAT_TEMPLATE,
    })
    return Qwen2TokenizerFast.from_pretrained(out)


def make_mistral_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    """A Mistral-style tokenizer (`<s>` written by the template, `<pad>` pads) with the chat
    template of Mistral Small 3.x for system and user turns of text."""
    train_bpe_tokenizer(out, MISTRAL_SPECIALS, [SYSTEM_MESSAGE], {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "chat_template": MISTRAL_CHAT_TEMPLATE,
    })
    return PreTrainedTokenizerFast.from_pretrained(out)


def tiny_transformer_and_vae(joint_dim: int, guidance_embeds: bool):
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=joint_dim, timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds,
    ).eval()
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 16], layers_per_block=1,
        latent_channels=32, norm_num_groups=8, sample_size=64, use_quant_conv=True, use_post_quant_conv=True,
    ).eval()
    return transformer, vae


def round_and_randomise_bn(text_model, transformer, vae):
    for i, m in enumerate([text_model, transformer, vae]):
        round_bf16_(m, 200 + i)
    # The batch norm's running statistics are what denormalises the latents: make them matter.
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        n = vae.bn.running_mean.shape[0]
        vae.bn.running_mean.copy_((0.5 * torch.randn(n, generator=g)).to(torch.bfloat16).float())
        vae.bn.running_var.copy_((0.5 + torch.rand(n, generator=g)).to(torch.bfloat16).float())


def save_pipeline(root: Path, text_model, transformer, vae, scheduler, index: dict, vae_encoder=False):
    """The diffusers layout, bf16, the text encoder without a vision tower (FLUX.2 encodes
    text only with it), the VAE's encoder only where reference images are tested."""
    text_model.save_pretrained(root / "text_encoder")
    save_bf16({k: v for k, v in text_model.state_dict().items()
               if not k.startswith(("model.vision_tower.", "model.multi_modal_projector."))},
              root / "text_encoder" / "model.safetensors")
    transformer.save_pretrained(root / "transformer")
    save_bf16(transformer.state_dict(), root / "transformer" / "diffusion_pytorch_model.safetensors")
    vae.save_pretrained(root / "vae")
    parts = ("decoder.", "post_quant_conv.") + (("encoder.", "quant_conv.") if vae_encoder else ())
    vae_sd = {k: v for k, v in vae.state_dict().items()
              if k.startswith(parts) or k in ("bn.running_mean", "bn.running_var")}
    save_bf16(vae_sd, root / "vae" / "diffusion_pytorch_model.safetensors")
    scheduler.save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_diffusers_version": "0.42.1", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"],
        # kiln reads the reference layers from here: the tiny text models have 4 layers.
        "_kiln": {"text_encoder_out_layers": list(OUT_LAYERS)}, **index,
    }, indent=1))


def flux2_scheduler():
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           time_shift_type="exponential")


def fresh(out_root: Path, name: str) -> Path:
    root = out_root / f"{name}-diffusers"
    if root.exists():
        shutil.rmtree(root)
    return root


def run_reference(name, out_root, pipe, text_model, chat_text, enc, args, tensors=None, settings=None):
    """Runs `pipe` with fixed initial latents and saves `{name}-reference.safetensors|json`:
    token ids, prompt embeddings (the prompt's rows and a few padding rows), the transformer's
    first output, the final latents and the image, and whatever `tensors`/`settings` add."""
    transformer = pipe.transformer
    lat_h, lat_w = 2 * (HEIGHT // (pipe.vae_scale_factor * 2)), 2 * (WIDTH // (pipe.vae_scale_factor * 2))
    g = torch.Generator().manual_seed(1234)
    latents = torch.randn((1, 128, lat_h // 2, lat_w // 2), generator=g)
    with torch.no_grad():
        hidden = text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                            output_hidden_states=True, use_cache=False).hidden_states
    assert len(hidden) == TEXT_LAYERS + 1, "hidden_states is (embeddings, layer 1, ..., layer N)"

    calls = []
    hook = transformer.register_forward_hook(
        lambda m, a, kwargs, out: calls.append((kwargs, out[0].detach().clone())), with_kwargs=True)
    common = dict(prompt=PROMPT, width=WIDTH, height=HEIGHT, num_inference_steps=STEPS, latents=latents.clone(),
                  max_sequence_length=MAX_SEQUENCE_LENGTH, text_encoder_out_layers=OUT_LAYERS, **args)
    with torch.no_grad():
        final = pipe(**common, output_type="latent").images
        first_kwargs, noise_pred_0 = calls[0]
        hook.remove()
        sigmas = pipe.scheduler.sigmas.tolist()
        image = pipe(**common, output_type="np").images[0]
        prompt_embeds, _ = pipe.encode_prompt(PROMPT, max_sequence_length=MAX_SEQUENCE_LENGTH,
                                              text_encoder_out_layers=OUT_LAYERS)
    valid = int(enc["attention_mask"].sum())
    save_file({
        "latents_in": latents.contiguous(),
        "input_ids": enc["input_ids"][0].to(torch.int64).contiguous(),
        # Only the prompt's own rows: the padded rows are 500 more of the same kind of numbers.
        "prompt_embeds_valid": prompt_embeds[:, :valid].contiguous(),
        "prompt_embeds_pad_rows": prompt_embeds[:, valid:valid + 4].contiguous(),
        "noise_pred_0": noise_pred_0.contiguous(),
        "final_latents": final.contiguous(),
        "image": to_u8(image),
        **(tensors(pipe, common) if tensors else {}),
    }, str(out_root / f"{name}-reference.safetensors"))
    (out_root / f"{name}-reference.json").write_text(json.dumps({
        "prompt": PROMPT, "chat_text": chat_text, "width": WIDTH, "height": HEIGHT, "steps": STEPS,
        "guidance": args.get("guidance_scale"), "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "text_encoder_out_layers": list(OUT_LAYERS), "valid_tokens": valid,
        "first_timestep": float(first_kwargs["timestep"][0]), "sigmas": sigmas, **(settings or {}),
    }, indent=1))
    print(f"{name}: image {WIDTH}x{HEIGHT}, {STEPS} steps, {valid} prompt tokens, "
          f"|noise_pred_0| max {noise_pred_0.abs().max():.3f}, |final| max {final.abs().max():.3f}")


def transformer_to_bfl(sd: dict) -> dict:
    """diffusers -> BFL names for a Flux2Transformer2DModel (the inverse of diffusers'
    `convert_flux2_transformer_checkpoint_to_diffusers`, which `build_klein` checks it against)."""
    fixed = {
        "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
        "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
        "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
        "single_stream_modulation.linear": "single_stream_modulation.lin",
    }
    double = {
        "attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
        "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
        "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
        "attn.to_out.0.weight": "img_attn.proj.weight", "attn.to_add_out.weight": "txt_attn.proj.weight",
        "ff.linear_in.weight": "img_mlp.0.weight", "ff.linear_out.weight": "img_mlp.2.weight",
        "ff_context.linear_in.weight": "txt_mlp.0.weight", "ff_context.linear_out.weight": "txt_mlp.2.weight",
    }
    single = {
        "attn.to_qkv_mlp_proj.weight": "linear1.weight", "attn.to_out.weight": "linear2.weight",
        "attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale",
    }
    out = {}
    for k, v in sd.items():
        stem = k.rsplit(".", 1)[0]
        if stem in fixed:
            out[f"{fixed[stem]}.weight"] = v
        elif k == "norm_out.linear.weight":
            scale, shift = v.chunk(2, dim=0)
            out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
        elif k.startswith("transformer_blocks."):
            _, i, inner = k.split(".", 2)
            if inner in double:
                out[f"double_blocks.{i}.{double[inner]}"] = v
            elif inner in ("attn.to_q.weight", "attn.add_q_proj.weight"):
                img = inner == "attn.to_q.weight"
                names = ["to_q", "to_k", "to_v"] if img else ["add_q_proj", "add_k_proj", "add_v_proj"]
                qkv = torch.cat([sd[f"transformer_blocks.{i}.attn.{n}.weight"] for n in names])
                out[f"double_blocks.{i}.{'img' if img else 'txt'}_attn.qkv.weight"] = qkv
        else:
            _, i, inner = k.split(".", 2)
            out[f"single_blocks.{i}.{single[inner]}"] = v
    return out


def to_u8(image):
    return torch.from_numpy((image * 255).round().astype(np.uint8)).contiguous()


def build_klein(out_root: Path):
    torch.manual_seed(3)
    root = fresh(out_root, "klein")
    tokenizer = make_qwen_tokenizer(root / "tokenizer")
    qwen = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )).eval()
    transformer, vae = tiny_transformer_and_vae(len(OUT_LAYERS) * TEXT_DIM, guidance_embeds=False)
    round_and_randomise_bn(qwen, transformer, vae)
    scheduler = flux2_scheduler()
    save_pipeline(root, qwen, transformer, vae, scheduler, {
        "_class_name": "Flux2KleinPipeline", "is_distilled": True,
        "text_encoder": ["transformers", "Qwen3ForCausalLM"], "tokenizer": ["transformers", "Qwen2TokenizerFast"],
    }, vae_encoder=True)
    # The transformer in BFL's names too, checked against diffusers' own conversion back.
    bfl = transformer_to_bfl(transformer.state_dict())
    back = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
    ref = transformer.state_dict()
    assert set(back) == set(ref), set(back) ^ set(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref), "BFL mapping does not round-trip"
    bfl_dir = out_root / "klein-bfl"
    if bfl_dir.exists():
        shutil.rmtree(bfl_dir)
    save_bf16(bfl, bfl_dir / "flux2-tiny-klein.safetensors")

    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=qwen, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=True)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    enc = tokenizer(text, return_tensors="pt", padding="max_length", truncation=True, max_length=MAX_SEQUENCE_LENGTH)

    def base_and_edit_runs(pipe, common):
        # The same weights run as the undistilled base: true classifier-free guidance against "".
        base = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=qwen, tokenizer=tokenizer,
                                  transformer=transformer, is_distilled=False)
        args = dict(common, num_inference_steps=BASE_STEPS, guidance_scale=BASE_GUIDANCE)
        # And the distilled model editing a reference image (a multiple of 4 pixels each way,
        # so diffusers neither resizes nor crops it).
        g = torch.Generator().manual_seed(99)
        ref = (torch.rand((REF_HEIGHT, REF_WIDTH, 3), generator=g) * 255).round().to(torch.uint8)
        edit = dict(common, image=[PIL.Image.fromarray(ref.numpy())])
        with torch.no_grad():
            return {"base_final_latents": base(**args, output_type="latent").images.contiguous(),
                    "base_image": to_u8(base(**args, output_type="np").images[0]),
                    "ref_image": ref.contiguous(),
                    "edit_final_latents": pipe(**edit, output_type="latent").images.contiguous(),
                    "edit_image": to_u8(pipe(**edit, output_type="np").images[0])}

    run_reference("klein", out_root, pipe, qwen, text, enc, {}, tensors=base_and_edit_runs,
                  settings={"base_steps": BASE_STEPS, "base_guidance": BASE_GUIDANCE})


def build_dev(out_root: Path):
    torch.manual_seed(4)
    root = fresh(out_root, "flux2-dev")
    tokenizer = make_mistral_tokenizer(root / "tokenizer")
    mistral = Mistral3ForConditionalGeneration(Mistral3Config(
        vision_config=PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, head_dim=16, image_size=64, patch_size=16),
        text_config=MistralConfig(
            vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
            rms_norm_eps=1e-5, rope_theta=1000000000.0, tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id),
        spatial_merge_size=2,
    )).eval()
    transformer, vae = tiny_transformer_and_vae(len(OUT_LAYERS) * TEXT_DIM, guidance_embeds=True)
    round_and_randomise_bn(mistral, transformer, vae)
    scheduler = flux2_scheduler()
    save_pipeline(root, mistral, transformer, vae, scheduler, {
        "_class_name": "Flux2Pipeline", "text_encoder": ["transformers", "Mistral3ForConditionalGeneration"],
        "tokenizer": ["transformers", "PixtralProcessor"],
    })
    pipe = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=mistral, tokenizer=tokenizer,
                         transformer=transformer)
    messages = format_input([PROMPT], system_message=SYSTEM_MESSAGE)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)[0]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True,
                                        return_tensors="pt", padding="max_length", truncation=True,
                                        max_length=MAX_SEQUENCE_LENGTH)
    run_reference("flux2-dev", out_root, pipe, mistral, text, enc, {"guidance_scale": DEV_GUIDANCE})


def add_expansion_reference(name: str, out_root: Path):
    """Prompt expansion as `Flux2Pipeline.upsample_prompt` runs it (the text-to-image system
    message, the chat template with the generation prompt, `generate`), but greedy so that it
    can be compared token for token, on the saved folder's text encoder; added to
    `{name}-reference.*`."""
    root = out_root / f"{name}-diffusers"
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(root / "tokenizer"))
    if name == "klein":
        model = Qwen3ForCausalLM.from_pretrained(str(root / "text_encoder"), dtype=torch.float32).eval()
        messages = [{"role": "system", "content": SYSTEM_MESSAGE_UPSAMPLING_T2I}, {"role": "user", "content": PROMPT}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
    else:
        model = Mistral3ForConditionalGeneration.from_pretrained(str(root / "text_encoder"),
                                                                 dtype=torch.float32).eval()
        messages = format_input([PROMPT], system_message=SYSTEM_MESSAGE_UPSAMPLING_T2I)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)[0]
    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=EXPANSION_TOKENS,
                             do_sample=False)
    new = out[0, ids.shape[1]:]
    add_to_reference(out_root, name,
                     {"expansion_prompt_ids": ids[0].to(torch.int64).contiguous(),
                      "expansion_ids": new.to(torch.int64).contiguous()},
                     {"expansion_chat_text": text, "expansion_max_new_tokens": EXPANSION_TOKENS,
                      "expansion_text": tokenizer.decode(new, skip_special_tokens=True)})
    print(f"{name}: expansion of {ids.shape[1]} prompt tokens, {len(new)} new tokens")


def vae_to_bfl(sd: dict, up_blocks: int) -> dict:
    """diffusers -> BFL names for an AutoencoderKLFlux2 (BFL's `ae.safetensors`): the original
    latent-diffusion names, decoder levels numbered in reverse, attention projections as 1x1
    convolutions, `quant_conv` inside the encoder and `post_quant_conv` inside the decoder."""
    out = {}
    for name, t in sd.items():
        if name == "bn.num_batches_tracked":
            continue
        new = name.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        new = new.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            new = new.replace(f"mid_block.attentions.0.{a}.", f"mid.attn_1.{b}.")
        if "mid.attn_1." in new and new.endswith("weight") and t.ndim == 2:
            t = t[:, :, None, None]
        if new.startswith("encoder.down_blocks."):
            new = new.replace("encoder.down_blocks.", "encoder.down.").replace(".resnets.", ".block.")
            new = new.replace(".downsamplers.0.", ".downsample.")
        if new.startswith("decoder.up_blocks."):
            i, rest = new[len("decoder.up_blocks."):].split(".", 1)
            rest = rest.replace("resnets.", "block.").replace("upsamplers.0.", "upsample.")
            new = f"decoder.up.{up_blocks - 1 - int(i)}.{rest}"
        new = {"quant_conv.weight": "encoder.quant_conv.weight", "quant_conv.bias": "encoder.quant_conv.bias",
               "post_quant_conv.weight": "decoder.post_quant_conv.weight",
               "post_quant_conv.bias": "decoder.post_quant_conv.bias"}.get(new, new)
        out[new] = t.contiguous()
    return out


def add_bfl_autoencoder(out_root: Path):
    """klein's VAE as BFL's `ae.safetensors` beside the BFL-named transformer, checked against
    diffusers' own latent-diffusion VAE conversion back (which knows the FLUX.1 layout: the
    quant convolutions at the top and no batch norm, so those are moved and compared apart)."""
    vae = AutoencoderKLFlux2.from_pretrained(out_root / "klein-diffusers" / "vae")
    ref = {k: v for k, v in vae.state_dict().items() if k != "bn.num_batches_tracked"}
    bfl = vae_to_bfl(ref, len(vae.config.block_out_channels))
    ldm = {k.replace("encoder.quant_conv", "quant_conv").replace("decoder.post_quant_conv", "post_quant_conv"): v
           for k, v in bfl.items() if not k.startswith("bn.")}
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    back.update({k: v for k, v in bfl.items() if k.startswith("bn.")})
    assert set(back) == set(ref), set(back) ^ set(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref), "BFL autoencoder mapping does not round-trip"
    save_file(bfl, out_root / "klein-bfl" / "ae.safetensors")
    print(f"klein-bfl/ae.safetensors: {len(bfl)} tensors")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "crates/kiln-engine/tests/fixtures"))
    p.add_argument("--only-expansion", action="store_true",
                   help="only add the prompt-expansion reference runs to the fixtures already in --out")
    p.add_argument("--only-bfl-autoencoder", action="store_true",
                   help="only write klein-bfl/ae.safetensors from the klein VAE already in --out")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    if args.only_bfl_autoencoder:
        add_bfl_autoencoder(out)
        return
    if not args.only_expansion:
        build_klein(out)
        build_dev(out)
    add_expansion_reference("klein", out)
    add_expansion_reference("flux2-dev", out)
    add_bfl_autoencoder(out)


if __name__ == "__main__":
    main()
