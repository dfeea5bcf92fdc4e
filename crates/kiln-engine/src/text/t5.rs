//! The T5 v1.1 encoder (transformers' `T5EncoderModel`): the FLUX.1 prompt embeddings.

use crate::error::{Error, Result};
use crate::layers::{attention, rms_norm, Linear};
use crate::weights::Weights;
use candle_core::Tensor;
use serde::Deserialize;

/// The fields of transformers' `T5Config` (config.json) the encoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
}

fn default_max_distance() -> usize {
    128
}
fn default_ff() -> String {
    "relu".into()
}

enum FeedForward {
    /// `wo(act(wi_0 x) * wi_1 x)`; T5 v1.1's "gated-gelu" (tanh approximation) or "gated-silu".
    Gated {
        wi_0: Linear,
        wi_1: Linear,
        wo: Linear,
        silu: bool,
    },
    /// The original T5's `wo(relu(wi x))`.
    Relu { wi: Linear, wo: Linear },
}

struct Block {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    attn_norm: Tensor,
    ff: FeedForward,
    ff_norm: Tensor,
}

pub(crate) struct T5Encoder {
    cfg: T5Config,
    embed: Tensor,
    relative_bias: Tensor,
    blocks: Vec<Block>,
    final_norm: Tensor,
}

impl T5Encoder {
    pub(crate) fn load(cfg: T5Config, w: &Weights) -> Result<Self> {
        let embed_name = ["shared.weight", "encoder.embed_tokens.weight"]
            .into_iter()
            .find(|n| w.contains(n))
            .ok_or_else(|| Error::checkpoint(w.path(), "T5: no token embedding"))?;
        let embed = w.tensor(embed_name)?;
        let relative_bias =
            w.tensor("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")?;
        let (gated, silu) = match cfg.feed_forward_proj.as_str() {
            "gated-gelu" => (true, false),
            "gated-silu" => (true, true),
            "relu" => (false, false),
            other => {
                return Err(Error::checkpoint(
                    w.path(),
                    format!("T5: unsupported feed_forward_proj {other}"),
                ))
            }
        };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("encoder.block.{i}.layer");
            let ff = if gated {
                FeedForward::Gated {
                    wi_0: w.linear(&format!("{p}.1.DenseReluDense.wi_0"))?,
                    wi_1: w.linear(&format!("{p}.1.DenseReluDense.wi_1"))?,
                    wo: w.linear(&format!("{p}.1.DenseReluDense.wo"))?,
                    silu,
                }
            } else {
                FeedForward::Relu {
                    wi: w.linear(&format!("{p}.1.DenseReluDense.wi"))?,
                    wo: w.linear(&format!("{p}.1.DenseReluDense.wo"))?,
                }
            };
            blocks.push(Block {
                q: w.linear(&format!("{p}.0.SelfAttention.q"))?,
                k: w.linear(&format!("{p}.0.SelfAttention.k"))?,
                v: w.linear(&format!("{p}.0.SelfAttention.v"))?,
                o: w.linear(&format!("{p}.0.SelfAttention.o"))?,
                attn_norm: w.tensor(&format!("{p}.0.layer_norm.weight"))?,
                ff,
                ff_norm: w.tensor(&format!("{p}.1.layer_norm.weight"))?,
            });
        }
        let final_norm = w.tensor("encoder.final_layer_norm.weight")?;
        Ok(Self {
            cfg,
            embed,
            relative_bias,
            blocks,
            final_norm,
        })
    }

    /// Hidden states `(1, len, d_model)` for token ids, every position attending to every other
    /// (FLUX passes no attention mask, padding included).
    pub(crate) fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        let dev = self.embed.device();
        let len = ids.len();
        let ids_t = Tensor::new(ids, dev)?;
        let mut x = self.embed.embedding(&ids_t)?.unsqueeze(0)?;
        let bias = self.position_bias(len)?;
        let (h, dk, eps) = (
            self.cfg.num_heads,
            self.cfg.d_kv,
            self.cfg.layer_norm_epsilon,
        );
        let heads = |t: Tensor| t.reshape((1, len, h, dk))?.transpose(1, 2);
        for b in &self.blocks {
            let n = rms_norm(&x, &b.attn_norm, eps)?;
            let q = heads(b.q.forward(&n)?)?;
            let k = heads(b.k.forward(&n)?)?;
            let v = heads(b.v.forward(&n)?)?;
            // T5 folds the 1/sqrt(d) scale into its initialisation: scores are unscaled.
            let a = attention(&q, &k, &v, 1.0, Some(&bias))?;
            let a = a.transpose(1, 2)?.reshape((1, len, h * dk))?;
            x = (x + b.o.forward(&a)?)?;
            let n = rms_norm(&x, &b.ff_norm, eps)?;
            let y = match &b.ff {
                FeedForward::Gated {
                    wi_0,
                    wi_1,
                    wo,
                    silu,
                } => {
                    let g = wi_0.forward(&n)?;
                    let g = if *silu { g.silu()? } else { g.gelu()? };
                    wo.forward(&(g * wi_1.forward(&n)?)?)?
                }
                FeedForward::Relu { wi, wo } => wo.forward(&wi.forward(&n)?.relu()?)?,
            };
            x = (x + y)?;
        }
        Ok(rms_norm(&x, &self.final_norm, eps)?)
    }

    /// The learned relative-position bias `(1, heads, len, len)` shared by all layers.
    fn position_bias(&self, len: usize) -> Result<Tensor> {
        let buckets: Vec<u32> = (0..len)
            .flat_map(|q| (0..len).map(move |k| (q, k)))
            .map(|(q, k)| {
                relative_bucket(
                    k as i64 - q as i64,
                    self.cfg.relative_attention_num_buckets,
                    self.cfg.relative_attention_max_distance,
                )
            })
            .collect();
        let idx = Tensor::new(buckets.as_slice(), self.relative_bias.device())?;
        let bias = self.relative_bias.embedding(&idx)?; // (len*len, heads)
        Ok(bias
            .reshape((len, len, self.cfg.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?)
    }
}

/// transformers' bidirectional `_relative_position_bucket`, with its f32 logarithm.
fn relative_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> u32 {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative > 0 { half } else { 0 };
    let n = relative.abs();
    let max_exact = half / 2;
    if n < max_exact {
        bucket += n;
    } else {
        let ratio = (n as f32 / max_exact as f32).ln()
            / ((max_distance as f64 / max_exact as f64).ln() as f32)
            * (half - max_exact) as f32;
        bucket += (max_exact + ratio as i64).min(half - 1);
    }
    bucket as u32
}

#[cfg(test)]
mod tests {
    use super::relative_bucket;

    #[test]
    fn buckets_match_transformers() {
        // Values from transformers' T5Attention._relative_position_bucket(32 buckets, 128).
        let cases = [
            (0, 0),
            (1, 17),
            (-1, 1),
            (7, 23),
            (8, 24),
            (-8, 8),
            (20, 26),
            (-200, 15),
            (500, 31),
        ];
        for (rel, want) in cases {
            assert_eq!(
                relative_bucket(rel, 32, 128),
                want,
                "relative position {rel}"
            );
        }
    }
}
