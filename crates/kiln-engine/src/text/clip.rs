//! CLIP's text transformer (transformers' `CLIPTextModel`): FLUX.1's pooled prompt vector.

use crate::error::Result;
use crate::layers::{attention, layer_norm, Linear};
use crate::weights::Weights;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

/// The fields of transformers' `CLIPTextConfig` (config.json) the text model needs.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// 2 in configurations written before transformers fixed it: pooling then takes the
    /// highest token id's position instead of the first end-of-text token's.
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
}

fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> u32 {
    2
}

struct Norm {
    weight: Tensor,
    bias: Tensor,
}

impl Norm {
    fn load(w: &Weights, p: &str) -> Result<Self> {
        Ok(Self {
            weight: w.tensor(&format!("{p}.weight"))?,
            bias: w.tensor(&format!("{p}.bias"))?,
        })
    }
    fn forward(&self, x: &Tensor, eps: f64) -> Result<Tensor> {
        Ok(layer_norm(x, Some((&self.weight, &self.bias)), eps)?)
    }
}

struct Layer {
    norm1: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: Norm,
    fc1: Linear,
    fc2: Linear,
}

pub(crate) struct ClipTextModel {
    cfg: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_norm: Norm,
}

impl ClipTextModel {
    pub(crate) fn load(cfg: ClipTextConfig, w: &Weights) -> Result<Self> {
        // Saved under `text_model.` by transformers 4 (FLUX.1's repositories), bare by 5.
        let p = if w.contains("text_model.embeddings.token_embedding.weight") {
            "text_model."
        } else {
            ""
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = format!("{p}encoder.layers.{i}");
            layers.push(Layer {
                norm1: Norm::load(w, &format!("{l}.layer_norm1"))?,
                q: w.linear(&format!("{l}.self_attn.q_proj"))?,
                k: w.linear(&format!("{l}.self_attn.k_proj"))?,
                v: w.linear(&format!("{l}.self_attn.v_proj"))?,
                out: w.linear(&format!("{l}.self_attn.out_proj"))?,
                norm2: Norm::load(w, &format!("{l}.layer_norm2"))?,
                fc1: w.linear(&format!("{l}.mlp.fc1"))?,
                fc2: w.linear(&format!("{l}.mlp.fc2"))?,
            });
        }
        Ok(Self {
            token_embedding: w.tensor(&format!("{p}embeddings.token_embedding.weight"))?,
            position_embedding: w.tensor(&format!("{p}embeddings.position_embedding.weight"))?,
            layers,
            final_norm: Norm::load(w, &format!("{p}final_layer_norm"))?,
            cfg,
        })
    }

    /// The pooled output `(1, hidden)`: the final-norm hidden state at the end-of-text token.
    pub(crate) fn pooled(&self, ids: &[u32]) -> Result<Tensor> {
        let dev = self.token_embedding.device();
        let len = ids.len();
        let (h, eps) = (self.cfg.num_attention_heads, self.cfg.layer_norm_eps);
        let dh = self.cfg.hidden_size / h;
        let tokens = self.token_embedding.embedding(&Tensor::new(ids, dev)?)?;
        let mut x = (tokens + self.position_embedding.narrow(0, 0, len)?)?.unsqueeze(0)?;
        let mask = causal_mask(len, dev)?;
        let heads = |t: Tensor| t.reshape((1, len, h, dh))?.transpose(1, 2);
        for l in &self.layers {
            let n = l.norm1.forward(&x, eps)?;
            let q = heads(l.q.forward(&n)?)?;
            let k = heads(l.k.forward(&n)?)?;
            let v = heads(l.v.forward(&n)?)?;
            let a = attention(&q, &k, &v, 1.0 / (dh as f64).sqrt(), Some(&mask))?;
            let a = a.transpose(1, 2)?.reshape((1, len, h * dh))?;
            x = (x + l.out.forward(&a)?)?;
            let n = l.norm2.forward(&x, eps)?;
            let m = l.fc1.forward(&n)?;
            let m = if self.cfg.hidden_act == "quick_gelu" {
                (&m * candle_nn::ops::sigmoid(&(&m * 1.702)?)?)?
            } else {
                m.gelu_erf()?
            };
            x = (x + l.fc2.forward(&m)?)?;
        }
        let x = self.final_norm.forward(&x, eps)?;
        Ok(x.narrow(1, self.eos_position(ids), 1)?.squeeze(1)?)
    }

    /// transformers' rule: with the legacy `eos_token_id == 2`, the first position of the
    /// highest id (end-of-text is the last token of CLIP's vocabulary); otherwise the first
    /// position of `eos_token_id`. Padding with end-of-text makes "first" matter.
    fn eos_position(&self, ids: &[u32]) -> usize {
        let eos = self.cfg.eos_token_id;
        if eos == 2 {
            let max = ids.iter().copied().max().unwrap_or(0);
            ids.iter().position(|&t| t == max).unwrap_or(0)
        } else {
            ids.iter().position(|&t| t == eos).unwrap_or(0)
        }
    }
}

fn causal_mask(len: usize, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(m, (len, len), dev)?.to_dtype(DType::F32)?)
}
