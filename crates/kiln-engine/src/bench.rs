//! Workloads for kiln's benchmark (`cargo run --release -p kiln-bench`): the engine's FLUX.1
//! transformer and VAE decoder at FLUX.1's full width on random weights, and the matrix
//! product they are made of.
//!
//! The random weights are written as a diffusers checkpoint first ([`write_checkpoint`]) and
//! loaded through the ordinary loading path, so the benchmark times exactly what a real
//! checkpoint runs, and diffusers (the benchmark's peer, `tools/bench/diffusers_bench.py`)
//! loads the very same weights and inputs: the two outputs can be compared at full size.

use crate::error::{Error, Result};
use crate::flux1::transformer::{FluxTransformer, TransformerConfig};
use crate::layers::blocks::Rope;
use crate::layers::Linear;
use crate::options::{Products, Runtime};
use crate::sampling;
use crate::vae::{VaeConfig, VaeDecoder};
use crate::weights::Weights;
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// FLUX.1 [dev]'s transformer with one double and one single block.
pub const TRANSFORMER_CONFIG: &str = r#"{
  "_class_name": "FluxTransformer2DModel",
  "patch_size": 1,
  "in_channels": 64,
  "num_layers": 1,
  "num_single_layers": 1,
  "attention_head_dim": 128,
  "num_attention_heads": 24,
  "joint_attention_dim": 4096,
  "pooled_projection_dim": 768,
  "guidance_embeds": true,
  "axes_dims_rope": [16, 56, 56]
}
"#;

/// FLUX.1's autoencoder (`ae.safetensors` in diffusers' layout).
pub const VAE_CONFIG: &str = r#"{
  "_class_name": "AutoencoderKL",
  "in_channels": 3,
  "out_channels": 3,
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
  "block_out_channels": [128, 256, 512, 512],
  "layers_per_block": 2,
  "latent_channels": 16,
  "norm_num_groups": 32,
  "sample_size": 1024,
  "scaling_factor": 0.3611,
  "shift_factor": 0.1159,
  "use_quant_conv": false,
  "use_post_quant_conv": false,
  "mid_block_add_attention": true
}
"#;

/// Text tokens of every transformer call (FLUX.1 [dev]'s T5 length).
pub const TEXT_TOKENS: usize = 512;
const WEIGHT_SEED: u64 = 1;
const INPUT_SEED: u64 = 2;

/// What [`write_checkpoint`] writes under its directory.
pub struct CheckpointPaths {
    pub transformer: PathBuf,
    pub vae: PathBuf,
    /// Inputs of the transformer and decoder calls, by image side (`transformer_{side}.*`,
    /// `latents_{side}`).
    pub inputs: PathBuf,
}

impl CheckpointPaths {
    pub fn new(dir: &Path) -> Self {
        Self {
            transformer: dir.join("transformer"),
            vae: dir.join("vae"),
            inputs: dir.join("inputs.safetensors"),
        }
    }
}

/// Writes (once: an existing complete checkpoint is kept) the random transformer and VAE in
/// diffusers' layout, and the seeded inputs for `sides` (image sides in pixels).
pub fn write_checkpoint(dir: &Path, sides: &[usize]) -> Result<CheckpointPaths> {
    let paths = CheckpointPaths::new(dir);
    write_model(
        &paths.transformer,
        TRANSFORMER_CONFIG,
        &transformer_tensors(),
    )?;
    write_model(&paths.vae, VAE_CONFIG, &vae_decoder_tensors())?;
    if !paths.inputs.exists() {
        let mut inputs = HashMap::new();
        for (i, &side) in sides.iter().enumerate() {
            let seed = INPUT_SEED + 16 * i as u64;
            let tokens = (side / 16) * (side / 16);
            inputs.insert(
                format!("transformer_{side}.img"),
                normal(seed, &[1, tokens, 64], 1.0)?,
            );
            inputs.insert(
                format!("transformer_{side}.txt"),
                normal(seed + 1, &[1, TEXT_TOKENS, 4096], 1.0)?,
            );
            inputs.insert(
                format!("transformer_{side}.pooled"),
                normal(seed + 2, &[1, 768], 1.0)?,
            );
            inputs.insert(
                format!("latents_{side}"),
                normal(seed + 3, &[1, 16, side / 8, side / 8], 1.0)?,
            );
        }
        save_atomically(&inputs, &paths.inputs)?;
    }
    Ok(paths)
}

fn write_model(dir: &Path, config: &str, tensors: &[(String, Vec<usize>)]) -> Result<()> {
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    if weights.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    std::fs::write(dir.join("config.json"), config).map_err(|e| Error::io(dir, e))?;
    let mut map = HashMap::new();
    for (i, (name, shape)) in tensors.iter().enumerate() {
        map.insert(
            name.clone(),
            initial_value(WEIGHT_SEED + i as u64, name, shape)?,
        );
    }
    save_atomically(&map, &weights)
}

fn save_atomically(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension("partial");
    candle_core::safetensors::save(tensors, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// PyTorch-like scales, so activations stay in a realistic range through the layers: matrices
/// and kernels ~ N(0, 1/fan_in), biases small, norm scales near one.
fn initial_value(seed: u64, name: &str, shape: &[usize]) -> Result<Tensor> {
    if shape.len() == 1 {
        let n = normal(seed, shape, 0.02)?;
        return if name.ends_with(".bias") {
            Ok(n)
        } else {
            Ok((n + 1.0)?)
        };
    }
    let fan_in: usize = shape[1..].iter().product();
    normal(seed, shape, 1.0 / (fan_in as f64).sqrt())
}

fn normal(seed: u64, shape: &[usize], std: f64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    Ok((sampling::noise(seed, n, 1, 1)?.reshape(shape)? * std)?)
}

fn linear(out: &mut Vec<(String, Vec<usize>)>, name: &str, rows: usize, cols: usize) {
    out.push((format!("{name}.weight"), vec![rows, cols]));
    out.push((format!("{name}.bias"), vec![rows]));
}

/// Every tensor of [`TRANSFORMER_CONFIG`], in diffusers' names.
fn transformer_tensors() -> Vec<(String, Vec<usize>)> {
    let (h, mlp, head, input, joint, pooled) = (3072, 12288, 128, 64, 4096, 768);
    let mut t = Vec::new();
    linear(&mut t, "x_embedder", h, input);
    linear(&mut t, "context_embedder", h, joint);
    for (embedder, width) in [
        ("timestep_embedder", 256),
        ("guidance_embedder", 256),
        ("text_embedder", pooled),
    ] {
        linear(
            &mut t,
            &format!("time_text_embed.{embedder}.linear_1"),
            h,
            width,
        );
        linear(
            &mut t,
            &format!("time_text_embed.{embedder}.linear_2"),
            h,
            h,
        );
    }
    let p = "transformer_blocks.0";
    linear(&mut t, &format!("{p}.norm1.linear"), 6 * h, h);
    linear(&mut t, &format!("{p}.norm1_context.linear"), 6 * h, h);
    for name in [
        "to_q",
        "to_k",
        "to_v",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_out.0",
        "to_add_out",
    ] {
        linear(&mut t, &format!("{p}.attn.{name}"), h, h);
    }
    for norm in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] {
        t.push((format!("{p}.attn.{norm}.weight"), vec![head]));
    }
    for ff in ["ff", "ff_context"] {
        linear(&mut t, &format!("{p}.{ff}.net.0.proj"), mlp, h);
        linear(&mut t, &format!("{p}.{ff}.net.2"), h, mlp);
    }
    let p = "single_transformer_blocks.0";
    linear(&mut t, &format!("{p}.norm.linear"), 3 * h, h);
    for name in ["to_q", "to_k", "to_v"] {
        linear(&mut t, &format!("{p}.attn.{name}"), h, h);
    }
    for norm in ["norm_q", "norm_k"] {
        t.push((format!("{p}.attn.{norm}.weight"), vec![head]));
    }
    linear(&mut t, &format!("{p}.proj_mlp"), mlp, h);
    linear(&mut t, &format!("{p}.proj_out"), h, h + mlp);
    linear(&mut t, "norm_out.linear", 2 * h, h);
    linear(&mut t, "proj_out", input, h);
    t
}

/// Every tensor of [`VAE_CONFIG`]'s decoder, in diffusers' names (the benchmark decodes only).
fn vae_decoder_tensors() -> Vec<(String, Vec<usize>)> {
    let mut t = Vec::new();
    let conv =
        |t: &mut Vec<(String, Vec<usize>)>, name: &str, cout: usize, cin: usize, k: usize| {
            t.push((format!("{name}.weight"), vec![cout, cin, k, k]));
            t.push((format!("{name}.bias"), vec![cout]));
        };
    let norm = |t: &mut Vec<(String, Vec<usize>)>, name: &str, c: usize| {
        t.push((format!("{name}.weight"), vec![c]));
        t.push((format!("{name}.bias"), vec![c]));
    };
    let resnet = |t: &mut Vec<(String, Vec<usize>)>, p: &str, cin: usize, cout: usize| {
        norm(t, &format!("{p}.norm1"), cin);
        conv(t, &format!("{p}.conv1"), cout, cin, 3);
        norm(t, &format!("{p}.norm2"), cout);
        conv(t, &format!("{p}.conv2"), cout, cout, 3);
        if cin != cout {
            conv(t, &format!("{p}.conv_shortcut"), cout, cin, 1);
        }
    };
    conv(&mut t, "decoder.conv_in", 512, 16, 3);
    resnet(&mut t, "decoder.mid_block.resnets.0", 512, 512);
    norm(&mut t, "decoder.mid_block.attentions.0.group_norm", 512);
    for name in ["to_q", "to_k", "to_v", "to_out.0"] {
        linear(
            &mut t,
            &format!("decoder.mid_block.attentions.0.{name}"),
            512,
            512,
        );
    }
    resnet(&mut t, "decoder.mid_block.resnets.1", 512, 512);
    let mut cin = 512;
    for (i, cout) in [512, 512, 256, 128].into_iter().enumerate() {
        for j in 0..3 {
            resnet(
                &mut t,
                &format!("decoder.up_blocks.{i}.resnets.{j}"),
                cin,
                cout,
            );
            cin = cout;
        }
        if i < 3 {
            conv(
                &mut t,
                &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                cout,
                cout,
                3,
            );
        }
    }
    norm(&mut t, "decoder.conv_norm_out", 128);
    conv(&mut t, "decoder.conv_out", 3, 128, 3);
    t
}

fn open(dir: &Path, rt: &Runtime) -> Result<Weights> {
    Weights::open_safetensors(&[dir.join("diffusion_pytorch_model.safetensors")], rt)
}

/// The inputs (stored in f32) on `rt`'s device in its dtype.
fn read_inputs(paths: &CheckpointPaths, rt: &Runtime) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(&paths.inputs, &rt.device)?
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(rt.dtype)?)))
        .collect()
}

fn input(inputs: &HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    inputs.get(name).cloned().ok_or_else(|| {
        Error::InvalidRequest(format!(
            "the benchmark inputs hold no {name}: delete the checkpoint folder to rewrite it"
        ))
    })
}

/// One call of the transformer on a `side x side` image's tokens and [`TEXT_TOKENS`] text tokens,
/// at timestep 0.5 and guidance 3.5 (as diffusers is called: `timestep=0.5, guidance=3.5`).
pub struct TransformerCall {
    model: FluxTransformer,
    img: Tensor,
    txt: Tensor,
    pooled: Tensor,
    rope: Rope,
    side: usize,
    dtype: DType,
}

impl TransformerCall {
    /// The model and inputs as `rt` computes (the inputs are stored in f32).
    pub fn load(paths: &CheckpointPaths, side: usize, rt: &Runtime) -> Result<Self> {
        let w = open(&paths.transformer, rt)?;
        let config = std::fs::read_to_string(paths.transformer.join("config.json"))
            .map_err(|e| Error::io(&paths.transformer, e))?;
        let cfg = TransformerConfig::from_diffusers_json(&config, &w)?;
        Self::with_model(cfg, &w, paths, side, rt)
    }

    /// The same call with the transformer read from a GGUF file in BFL's names, as the engine
    /// loads a GGUF checkpoint (`tools/bench/write_gguf.py` writes one of these weights).
    pub fn load_gguf(
        file: &Path,
        paths: &CheckpointPaths,
        side: usize,
        rt: &Runtime,
    ) -> Result<Self> {
        let (cfg, w) = crate::flux1::bfl_transformer(Weights::open_gguf(file, rt)?)?;
        Self::with_model(cfg, &w, paths, side, rt)
    }

    fn with_model(
        cfg: TransformerConfig,
        w: &Weights,
        paths: &CheckpointPaths,
        side: usize,
        rt: &Runtime,
    ) -> Result<Self> {
        let model = FluxTransformer::load(cfg, w, &mut |_| {})?;
        let inputs = read_inputs(paths, rt)?;
        let grid = side / 16;
        let rope = model.rope(TEXT_TOKENS, grid, grid, &rt.device)?;
        Ok(Self {
            img: input(&inputs, &format!("transformer_{side}.img"))?,
            txt: input(&inputs, &format!("transformer_{side}.txt"))?,
            pooled: input(&inputs, &format!("transformer_{side}.pooled"))?,
            model,
            rope,
            side,
            dtype: rt.dtype,
        })
    }

    pub fn run(&self) -> Result<Tensor> {
        let t = sampling::model_timestep(0.5, self.dtype);
        let g = sampling::model_guidance(3.5, self.dtype);
        self.model
            .forward(&self.img, &self.txt, &self.pooled, t, Some(g), &self.rope)
    }

    /// Multiply-adds times two of the call's matrix products and attention (the rest is
    /// linear in the tokens and negligible beside them).
    pub fn flops(&self) -> f64 {
        transformer_flops(self.model.config(), (self.side / 16).pow(2), TEXT_TOKENS)
    }
}

fn transformer_flops(c: &TransformerConfig, img: usize, txt: usize) -> f64 {
    let h = (c.num_heads * c.head_dim) as f64;
    let mlp = c.mlp_hidden as f64;
    let (img, txt) = (img as f64, txt as f64);
    let all = img + txt;
    // Per token of a stream in a double block: q, k, v, out (4 h^2) and the MLP (2 h mlp).
    let double_stream = 4.0 * h * h + 2.0 * h * mlp;
    // Per token of a single block: q, k, v and the MLP in (3 h^2 + h mlp), out ((h + mlp) h).
    let single = 3.0 * h * h + h * mlp + (h + mlp) * h;
    // Scores and their product with the values, over every head.
    let attention = 2.0 * all * all * h;
    let per_block = |tokens_linear: f64| 2.0 * (tokens_linear + attention);
    c.depth as f64 * per_block(all * double_stream)
        + c.depth_single as f64 * per_block(all * single)
        + 2.0 * (img * (c.in_channels as f64) * h * 2.0 + txt * c.joint_dim as f64 * h)
}

/// One decode of `side x side` pixels' latents by the VAE decoder.
pub struct VaeDecode {
    decoder: VaeDecoder,
    latents: Tensor,
}

impl VaeDecode {
    /// The decoder and latents as `rt` computes.
    pub fn load(paths: &CheckpointPaths, side: usize, rt: &Runtime) -> Result<Self> {
        let w = open(&paths.vae, rt)?;
        let config = std::fs::read_to_string(paths.vae.join("config.json"))
            .map_err(|e| Error::io(&paths.vae, e))?;
        let cfg: VaeConfig = serde_json::from_str(&config)
            .map_err(|e| Error::checkpoint(&paths.vae, format!("config.json: {e}")))?;
        let inputs = read_inputs(paths, rt)?;
        Ok(Self {
            decoder: VaeDecoder::load(cfg, &w)?,
            latents: input(&inputs, &format!("latents_{side}"))?,
        })
    }

    pub fn run(&self) -> Result<Tensor> {
        self.decoder.decode(&self.latents)
    }

    /// Decodes a transformer's packed output `(1, tokens, 64)` as a generation's last step does.
    pub fn decode_packed(&self, packed: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = self.latents.dims4()?;
        self.decoder.decode(&sampling::unpack(packed, h, w)?)
    }

    /// Twice the multiply-adds of the decoder's convolutions and attention.
    pub fn flops(&self) -> Result<f64> {
        let cfg = self.decoder.config();
        let (_, _, h, w) = self.latents.dims4()?;
        Ok(decoder_flops(cfg, h * w))
    }
}

fn decoder_flops(cfg: &VaeConfig, latent_pixels: usize) -> f64 {
    let conv = |pixels: usize, cin: usize, cout: usize, k: usize| {
        2.0 * (pixels * cin * cout * k * k) as f64
    };
    let resnet = |pixels: usize, cin: usize, cout: usize| {
        conv(pixels, cin, cout, 3)
            + conv(pixels, cout, cout, 3)
            + if cin != cout {
                conv(pixels, cin, cout, 1)
            } else {
                0.0
            }
    };
    let chans: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
    let top = chans[0];
    let p = latent_pixels;
    // conv_in, the mid block's two resnets and its attention (4 projections, scores and values).
    let mut total = conv(p, cfg.latent_channels, top, 3)
        + 2.0 * resnet(p, top, top)
        + 2.0 * (4 * p * top * top + 2 * p * p * top) as f64;
    let mut pixels = p;
    let mut cin = top;
    for (i, &cout) in chans.iter().enumerate() {
        for _ in 0..=cfg.layers_per_block {
            total += resnet(pixels, cin, cout);
            cin = cout;
        }
        if i + 1 < chans.len() {
            pixels *= 4;
            total += conv(pixels, cout, cout, 3);
        }
    }
    total + conv(pixels, cin, 3, 3)
}

/// `n x n` by `n x n` matrices, multiplied the way the engine's layers multiply.
pub struct MatrixProduct {
    x: Tensor,
    /// `x W^T` through the engine's own linear layer (no bias): the product the transformer's
    /// layers run, not candle's generic matmul.
    layer: Linear,
    n: usize,
}

impl MatrixProduct {
    pub fn new(n: usize, rt: &Runtime) -> Result<Self> {
        let weight = rt.put(&normal(INPUT_SEED + 1, &[n, n], 1.0)?)?;
        let layer = match rt.products {
            Products::Native => Linear::dense(weight, None),
            Products::CpuBf16 => Linear::packed_bf16(&weight, None)?,
        };
        Ok(Self {
            x: rt.put(&normal(INPUT_SEED, &[n, n], 1.0)?)?,
            layer,
            n,
        })
    }

    pub fn run(&self) -> Result<Tensor> {
        Ok(self.layer.forward(&self.x)?)
    }

    pub fn flops(&self) -> f64 {
        2.0 * (self.n as f64).powi(3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transformer_flops_match_the_known_figure() {
        // flux-models.md: one double + one single block at 512x512 with 512 text tokens is
        // about 754 GFLOP; the input and output projections add 13.7 (the text's 12.9).
        let w = 3072;
        let cfg = TransformerConfig {
            in_channels: 64,
            out_channels: 64,
            num_heads: 24,
            head_dim: 128,
            depth: 1,
            depth_single: 1,
            joint_dim: 4096,
            pooled_dim: 768,
            mlp_hidden: 4 * w,
            axes_dim: vec![16, 56, 56],
            theta: 10_000.0,
            guidance_embeds: true,
        };
        let gflop = transformer_flops(&cfg, 1024, 512) / 1e9;
        assert!((gflop - 767.7).abs() < 1.0, "{gflop}");
    }
}
