"""Trains kiln's demo checkpoint: a small FLUX.1-architecture pipeline (CLIP- and T5-style text
encoders, FLUX transformer with double and single blocks, FLUX-style VAE) on procedural scenes
(scenes.py), and exports it in diffusers' folder layout. See README.md in this folder.

Stages, each resumable from its last checkpoint in --work:
1. tokenizers, trained on every caption the scene generator can write;
2. the VAE (reconstruction + a small KL term), then its latent statistics -> scale/shift;
3. the transformer with both text encoders, jointly, VAE frozen, rectified flow:
   x_t = (1 - t) x0 + t e, predict e - x0, t logit-normal;
4. export (EMA weights), the loss plot, sample images.

Every random draw comes from the seed and the step number, so a resumed run draws what an
uninterrupted one would have.
"""

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import Tokenizer
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

import scenes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from flux_parts import (CLIP_BOS, CLIP_EOS, save_t5_tokenizer, t5_unigram_of_words, train_clip_bpe,  # noqa: E402
                        write_clip_tokenizer_config, write_model_index)

REPO = Path(__file__).resolve().parents[2]
CLIP_LEN = 77
T5_LEN = 32  # longer than any caption (at most 26 T5 tokens)
TEXT_DIM = 64
VAE = dict(block_out_channels=[16, 32, 64, 64], layers_per_block=1, latent_channels=16, norm_num_groups=8)
TRANSFORMER = dict(num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
                   axes_dims_rope=[8, 12, 12])
KL_WEIGHT = 1e-4
# A caption dropped (trained as the empty prompt) this often teaches the model the
# unconditional velocity that classifier-free guidance subtracts.
CAPTION_DROPOUT = 0.1
DESCRIPTION = ("kiln's demo checkpoint, a small model trained only on simple coloured shapes at 64x64 pixels "
               "(assets/demo-checkpoint/MODEL_CARD.md)")


def log(msg):
    print(msg, flush=True)


# --- tokenizers -------------------------------------------------------------------------------

def make_tokenizers(root: Path):
    corpus = scenes.caption_corpus()
    clip = train_clip_bpe(corpus, 400)
    clip.add_special_tokens([CLIP_BOS, CLIP_EOS])
    (root / "tokenizer").mkdir(parents=True, exist_ok=True)
    clip.save(str(root / "tokenizer" / "tokenizer.json"))
    write_clip_tokenizer_config(root / "tokenizer", CLIP_LEN)
    t5 = t5_unigram_of_words(corpus)
    save_t5_tokenizer(t5, root / "tokenizer_2", T5_LEN)


class Texts:
    """Token ids framed and padded as kiln's engine (and transformers) do: CLIP `<bos> ... <eos>`
    padded with `<eos>` to 77, T5 `... </s>` padded with `<pad>` to T5_LEN."""

    def __init__(self, root: Path):
        self.clip = Tokenizer.from_file(str(root / "tokenizer" / "tokenizer.json"))
        self.t5 = Tokenizer.from_file(str(root / "tokenizer_2" / "tokenizer.json"))
        self.bos, self.eos = self.clip.token_to_id(CLIP_BOS), self.clip.token_to_id(CLIP_EOS)
        self.cache = {}

    def ids(self, caption: str):
        if caption not in self.cache:
            c = [self.bos] + self.clip.encode(caption, add_special_tokens=False).ids + [self.eos]
            t = self.t5.encode(caption, add_special_tokens=False).ids + [1]
            assert len(c) <= CLIP_LEN and len(t) <= T5_LEN, caption
            self.cache[caption] = (c + [self.eos] * (CLIP_LEN - len(c)), t + [0] * (T5_LEN - len(t)))
        return self.cache[caption]

    def batch(self, captions):
        c, t = zip(*(self.ids(x) for x in captions))
        return torch.tensor(c), torch.tensor(t)


# --- models -----------------------------------------------------------------------------------

def make_vae():
    n = len(VAE["block_out_channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                         up_block_types=["UpDecoderBlock2D"] * n, sample_size=64, scaling_factor=1.0, shift_factor=0.0,
                         use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True, **VAE)


def make_text_encoders(root: Path):
    clip_vocab = Tokenizer.from_file(str(root / "tokenizer" / "tokenizer.json")).get_vocab_size()
    t5_vocab = Tokenizer.from_file(str(root / "tokenizer_2" / "tokenizer.json")).get_vocab_size()
    eos = Tokenizer.from_file(str(root / "tokenizer" / "tokenizer.json")).token_to_id(CLIP_EOS)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CLIP_LEN, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos, projection_dim=TEXT_DIM))
    t5 = T5EncoderModel(T5Config(
        vocab_size=t5_vocab, d_model=TEXT_DIM, d_kv=16, d_ff=4 * TEXT_DIM, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False))
    return clip, t5


def make_transformer():
    return FluxTransformer2DModel(patch_size=1, in_channels=4 * VAE["latent_channels"], joint_attention_dim=TEXT_DIM,
                                  pooled_projection_dim=TEXT_DIM, guidance_embeds=False, **TRANSFORMER)


# --- data -------------------------------------------------------------------------------------

def scene_batch(seed: int, step: int, n: int, size=None):
    """`n` scenes rendered at one bucket size (random unless given), as [-1, 1] NCHW, with captions."""
    rng = np.random.default_rng([seed, step])
    w, h = size or scenes.BUCKETS[rng.integers(len(scenes.BUCKETS))]
    imgs, caps = [], []
    for _ in range(n):
        scene, caption = scenes.sample_scene(rng)
        imgs.append(scenes.render(scene, w, h))
        caps.append(caption)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, caps


# --- training loops ---------------------------------------------------------------------------

def save_state(path: Path, state: dict):
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def progress(stage, step, total, loss, t0, first):
    rate = (time.time() - t0) / max(step - first, 1)
    log(f"[{stage}] step {step}/{total} loss {loss:.4f} {rate:.2f} s/step eta {(total - step) * rate / 60:.1f} min")


def train_vae(work: Path, seed: int, steps: int, batch: int, every: int):
    path = work / "vae.pt"
    torch.manual_seed(seed)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    state = dict(step=0, losses=[])
    if path.exists():
        state = torch.load(path, weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        log(f"[vae] resumed at step {state['step']}")
    t0, first = time.time(), state["step"]
    vae.train()
    for step in range(state["step"], steps):
        x, _ = scene_batch(seed, 10_000_000 + step, batch, (64, 64))
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + KL_WEIGHT * kl
        lr = 1e-3 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        state["losses"].append((step, loss.item()))
        if (step + 1) % 25 == 0:
            progress("vae", step + 1, steps, np.mean([l for _, l in state["losses"][-25:]]), t0, first)
        if (step + 1) % every == 0 or step + 1 == steps:
            state.update(step=step + 1, model=vae.state_dict(), opt=opt.state_dict())
            save_state(path, state)
    # The latent statistics of the VAE as trained so far (again when it was trained further).
    if state.get("stats", {}).get("step") != state["step"]:
        vae.eval()
        zs = []
        with torch.no_grad():
            for i in range(16):
                x, _ = scene_batch(seed, 20_000_000 + i, 64)
                zs.append(vae.encode(x).latent_dist.mean)
        z = torch.cat([t.flatten() for t in zs])
        state["stats"] = dict(shift=float(z.mean()), scale=float(1.0 / z.std()), step=state["step"])
        state.update(model=vae.state_dict(), opt=opt.state_dict())
        save_state(path, state)
        log(f"[vae] latent shift {state['stats']['shift']:.4f} scale {state['stats']['scale']:.4f}")
    vae.register_to_config(scaling_factor=state["stats"]["scale"], shift_factor=state["stats"]["shift"])
    return vae.eval().requires_grad_(False), state["losses"], state["step"]


def encode_text(clip, t5, clip_ids, t5_ids):
    pooled = clip(clip_ids).pooler_output
    return pooled, t5(t5_ids).last_hidden_state


def velocity(transformer, xt, t, pooled, t5_states, h, w):
    """The transformer on packed latents `xt` of an h x w latent grid at noise level t."""
    img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, xt.device, xt.dtype)
    txt_ids = torch.zeros(t5_states.shape[1], 3)
    return transformer(hidden_states=xt, encoder_hidden_states=t5_states, pooled_projections=pooled, timestep=t,
                       img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)[0]


def train_flow(work: Path, root: Path, vae, vae_step: int, seed: int, steps: int, batch: int, every: int,
               lr_max: float):
    path = work / "flow.pt"
    torch.manual_seed(seed + 1)
    clip, t5 = make_text_encoders(root)
    transformer = make_transformer()
    modules = torch.nn.ModuleDict(dict(clip=clip, t5=t5, transformer=transformer))
    ema = make_ema(modules)
    opt = torch.optim.AdamW(modules.parameters(), lr=lr_max, weight_decay=0.01)
    state = dict(step=0, losses=[], vae_step=vae_step)
    if path.exists():
        state = torch.load(path, weights_only=False)
        if state["vae_step"] != vae_step:
            sys.exit(f"{path} was trained on the VAE at step {state['vae_step']}, not {vae_step}: "
                     "remove it to train the transformer again")
        modules.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        log(f"[flow] resumed at step {state['step']}")
    texts = Texts(root)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    t0, first = time.time(), state["step"]
    modules.train()
    for step in range(state["step"], steps):
        x, caps = scene_batch(seed, step, batch)
        g = torch.Generator().manual_seed(seed * 1_000_003 + 7 + step)
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = (post.mean + post.std * torch.randn(post.mean.shape, generator=g) - shift) * scale
        b, c, h, w = z.shape
        x0 = FluxPipeline._pack_latents(z, b, c, h, w)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.sigmoid(torch.randn(b, generator=g))
        dropped = torch.rand(b, generator=g) < CAPTION_DROPOUT
        caps = ["" if d else c for c, d in zip(caps, dropped.tolist())]
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        pooled, t5_states = encode_text(clip, t5, *texts.batch(caps))
        pred = velocity(transformer, xt, t, pooled, t5_states, h, w)
        loss = F.mse_loss(pred, noise - x0)
        for group in opt.param_groups:
            group["lr"] = lr_max * min(1.0, (step + 1) / 200)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        update_ema(ema, modules, min(0.999, (1 + step) / (10 + step)))
        state["losses"].append((step, loss.item()))
        if (step + 1) % 25 == 0:
            progress("flow", step + 1, steps, np.mean([l for _, l in state["losses"][-25:]]), t0, first)
        if (step + 1) % every == 0 or step + 1 == steps:
            state.update(step=step + 1, model=modules.state_dict(), ema=ema.state_dict(), opt=opt.state_dict())
            save_state(path, state)
    return ema, state["losses"]


def make_ema(modules):
    import copy
    ema = copy.deepcopy(modules).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema, modules, decay):
    for e, p in zip(ema.parameters(), modules.parameters()):
        e.lerp_(p, 1 - decay)


# --- export -----------------------------------------------------------------------------------

def export(root: Path, out: Path, vae, ema, info: dict):
    """The diffusers folder: `root` already holds the tokenizers."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(root, out)
    ema["clip"].save_pretrained(out / "text_encoder")
    ema["t5"].save_pretrained(out / "text_encoder_2")
    ema["transformer"].save_pretrained(out / "transformer")
    vae.save_pretrained(out / "vae")
    FlowMatchEulerDiscreteScheduler(shift=info["shift"], use_dynamic_shifting=False).save_pretrained(out / "scheduler")
    write_model_index(out, _kiln=dict(max_pixels=64 * 64, steps=info["steps"], true_cfg_scale=info["cfg_scale"],
                                      description=DESCRIPTION))
    scenes.write_test_set(out / "heldout_prompts.json")


def plot(vae_losses, flow_losses, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, losses, title in ((axes[0], vae_losses, "VAE (MSE + L1/2 + KL)"),
                              (axes[1], flow_losses, "transformer + text encoders (flow matching MSE)")):
        s, l = np.array(losses).T
        k = max(1, len(l) // 200)
        smooth = np.convolve(l, np.ones(k) / k, mode="valid")
        ax.plot(s, l, alpha=0.25, lw=0.5)
        ax.plot(s[k - 1:], smooth, lw=1.5)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(REPO / "target-demo"), help="checkpoints in progress (resumable)")
    p.add_argument("--out", default=str(REPO / "assets/demo-checkpoint"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1800)
    p.add_argument("--steps", type=int, default=6000, help="transformer steps (raise and rerun to train longer)")
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=1, help="1 is faster than 2 on a shared 2-core machine")
    p.add_argument("--sample-steps", type=int, default=8, help="the checkpoint's default steps")
    p.add_argument("--shift", type=float, default=2.0, help="the scheduler's time shift")
    p.add_argument("--cfg-scale", type=float, default=3.0,
                   help="the checkpoint's default classifier-free guidance scale (against the empty prompt)")
    p.add_argument("--export-only", action="store_true", help="export what --work holds without training further")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    root = work / "pipeline"
    work.mkdir(parents=True, exist_ok=True)
    if not (root / "tokenizer_2" / "tokenizer.json").exists():
        make_tokenizers(root)
    if args.export_only:
        args.vae_steps = torch.load(work / "vae.pt", weights_only=False)["step"]
        args.steps = torch.load(work / "flow.pt", weights_only=False)["step"]
    vae, vae_losses, vae_step = train_vae(work, args.seed, args.vae_steps, 32, args.checkpoint_every)
    ema, flow_losses = train_flow(work, root, vae, vae_step, args.seed, args.steps, args.batch, args.checkpoint_every,
                                  args.lr)
    out = Path(args.out)
    export(root, out, vae, ema, dict(shift=args.shift, steps=args.sample_steps, cfg_scale=args.cfg_scale))
    plot(vae_losses, flow_losses, out / "loss.png")
    (out / "training.json").write_text(json.dumps(dict(
        seed=args.seed, vae_steps=args.vae_steps, steps=args.steps, batch=args.batch, lr=args.lr,
        caption_dropout=CAPTION_DROPOUT, cfg_scale=args.cfg_scale,
        final_vae_loss=float(np.mean([l for _, l in vae_losses[-100:]])),
        final_flow_loss=float(np.mean([l for _, l in flow_losses[-100:]])),
    ), indent=1) + "\n")
    log(f"exported to {out}")


if __name__ == "__main__":
    main()
