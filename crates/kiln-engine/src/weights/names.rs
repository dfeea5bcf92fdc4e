//! Where BFL's single files keep each diffusers-named tensor: FLUX.1's and FLUX.2's
//! transformers (fused qkv and modulation tensors cut into rows) and the autoencoder's
//! latent-diffusion names.

use super::Source;
use std::ops::Range;

/// A whole stored tensor.
fn whole(name: String) -> Option<Source> {
    Some(Source { name, rows: None })
}

/// Rows `range` of a stored tensor.
fn rows_of(name: String, range: Range<usize>) -> Option<Source> {
    Some(Source {
        name,
        rows: Some(vec![range]),
    })
}

/// BFL's final-layer modulation, whose (shift, scale) halves diffusers'
/// AdaLayerNormContinuous chunks as (scale, shift).
fn final_modulation(suffix: &str, hidden: usize) -> Option<Source> {
    Some(Source {
        name: format!("final_layer.adaLN_modulation.1.{suffix}"),
        rows: Some(vec![hidden..2 * hidden, 0..hidden]),
    })
}

/// A double block's attention tensors (`inner` after `transformer_blocks.N.`), which FLUX.1
/// and FLUX.2 name alike in both layouts; `b` is BFL's `double_blocks.N`.
fn double_attention_source(b: &str, inner: &str, suffix: &str, hidden: usize) -> Option<Source> {
    let part = |n: String, i: usize| rows_of(n, i * hidden..(i + 1) * hidden);
    let norm = |n: &str| whole(format!("{b}.{n}.scale"));
    match inner {
        "attn.to_q" => part(format!("{b}.img_attn.qkv.{suffix}"), 0),
        "attn.to_k" => part(format!("{b}.img_attn.qkv.{suffix}"), 1),
        "attn.to_v" => part(format!("{b}.img_attn.qkv.{suffix}"), 2),
        "attn.add_q_proj" => part(format!("{b}.txt_attn.qkv.{suffix}"), 0),
        "attn.add_k_proj" => part(format!("{b}.txt_attn.qkv.{suffix}"), 1),
        "attn.add_v_proj" => part(format!("{b}.txt_attn.qkv.{suffix}"), 2),
        "attn.norm_q" => norm("img_attn.norm.query_norm"),
        "attn.norm_k" => norm("img_attn.norm.key_norm"),
        "attn.norm_added_q" => norm("txt_attn.norm.query_norm"),
        "attn.norm_added_k" => norm("txt_attn.norm.key_norm"),
        "attn.to_out.0" => whole(format!("{b}.img_attn.proj.{suffix}")),
        "attn.to_add_out" => whole(format!("{b}.txt_attn.proj.{suffix}")),
        _ => None,
    }
}

/// The layout both BFL transformer namings share: renamed top-level tensors (`fixed`), the
/// final modulation with its halves swapped, then per-block names: `double` and `single` map
/// `(BFL block, name inside the diffusers block, suffix)`.
fn bfl_source_with(
    name: &str,
    hidden: usize,
    fixed: fn(&str) -> Option<&'static str>,
    double: &dyn Fn(&str, &str, &str) -> Option<Source>,
    single: &dyn Fn(&str, &str, &str) -> Option<Source>,
) -> Option<Source> {
    let (stem, suffix) = name.rsplit_once('.')?;
    if let Some(f) = fixed(stem) {
        return whole(format!("{f}.{suffix}"));
    }
    if stem == "norm_out.linear" {
        return final_modulation(suffix, hidden);
    }
    if let Some(rest) = stem.strip_prefix("transformer_blocks.") {
        let (i, inner) = rest.split_once('.')?;
        let b = format!("double_blocks.{i}");
        return double(&b, inner, suffix)
            .or_else(|| double_attention_source(&b, inner, suffix, hidden));
    }
    let rest = stem.strip_prefix("single_transformer_blocks.")?;
    let (i, inner) = rest.split_once('.')?;
    single(&format!("single_blocks.{i}"), inner, suffix)
}

/// The BFL tensor (and rows) holding a diffusers FLUX.1 transformer tensor; the inverse of
/// diffusers' `convert_flux_transformer_checkpoint_to_diffusers`.
pub(super) fn bfl_transformer_source(name: &str, hidden: usize, mlp: usize) -> Option<Source> {
    // The `i`-th of the `hidden`-row parts of a fused tensor (q, k, v of a fused qkv).
    let part = |n: String, i: usize| rows_of(n, i * hidden..(i + 1) * hidden);
    bfl_source_with(
        name,
        hidden,
        |stem| match stem {
            "time_text_embed.timestep_embedder.linear_1" => Some("time_in.in_layer"),
            "time_text_embed.timestep_embedder.linear_2" => Some("time_in.out_layer"),
            "time_text_embed.guidance_embedder.linear_1" => Some("guidance_in.in_layer"),
            "time_text_embed.guidance_embedder.linear_2" => Some("guidance_in.out_layer"),
            "time_text_embed.text_embedder.linear_1" => Some("vector_in.in_layer"),
            "time_text_embed.text_embedder.linear_2" => Some("vector_in.out_layer"),
            "context_embedder" => Some("txt_in"),
            "x_embedder" => Some("img_in"),
            "proj_out" => Some("final_layer.linear"),
            _ => None,
        },
        &|b, inner, suffix| match inner {
            "norm1.linear" => whole(format!("{b}.img_mod.lin.{suffix}")),
            "norm1_context.linear" => whole(format!("{b}.txt_mod.lin.{suffix}")),
            "ff.net.0.proj" => whole(format!("{b}.img_mlp.0.{suffix}")),
            "ff.net.2" => whole(format!("{b}.img_mlp.2.{suffix}")),
            "ff_context.net.0.proj" => whole(format!("{b}.txt_mlp.0.{suffix}")),
            "ff_context.net.2" => whole(format!("{b}.txt_mlp.2.{suffix}")),
            _ => None,
        },
        &|b, inner, suffix| match inner {
            "norm.linear" => whole(format!("{b}.modulation.lin.{suffix}")),
            "attn.to_q" => part(format!("{b}.linear1.{suffix}"), 0),
            "attn.to_k" => part(format!("{b}.linear1.{suffix}"), 1),
            "attn.to_v" => part(format!("{b}.linear1.{suffix}"), 2),
            "proj_mlp" => rows_of(
                format!("{b}.linear1.{suffix}"),
                3 * hidden..3 * hidden + mlp,
            ),
            "attn.norm_q" => whole(format!("{b}.norm.query_norm.scale")),
            "attn.norm_k" => whole(format!("{b}.norm.key_norm.scale")),
            "proj_out" => whole(format!("{b}.linear2.{suffix}")),
            _ => None,
        },
    )
}

/// Where BFL's FLUX.2 file keeps a diffusers-named `Flux2Transformer2DModel` tensor. Unlike
/// FLUX.1, single blocks keep their fused qkv+MLP projection in both layouts.
pub(super) fn bfl_flux2_transformer_source(name: &str, hidden: usize) -> Option<Source> {
    bfl_source_with(
        name,
        hidden,
        |stem| match stem {
            "time_guidance_embed.timestep_embedder.linear_1" => Some("time_in.in_layer"),
            "time_guidance_embed.timestep_embedder.linear_2" => Some("time_in.out_layer"),
            "time_guidance_embed.guidance_embedder.linear_1" => Some("guidance_in.in_layer"),
            "time_guidance_embed.guidance_embedder.linear_2" => Some("guidance_in.out_layer"),
            "double_stream_modulation_img.linear" => Some("double_stream_modulation_img.lin"),
            "double_stream_modulation_txt.linear" => Some("double_stream_modulation_txt.lin"),
            "single_stream_modulation.linear" => Some("single_stream_modulation.lin"),
            "context_embedder" => Some("txt_in"),
            "x_embedder" => Some("img_in"),
            "proj_out" => Some("final_layer.linear"),
            _ => None,
        },
        &|b, inner, suffix| match inner {
            "ff.linear_in" => whole(format!("{b}.img_mlp.0.{suffix}")),
            "ff.linear_out" => whole(format!("{b}.img_mlp.2.{suffix}")),
            "ff_context.linear_in" => whole(format!("{b}.txt_mlp.0.{suffix}")),
            "ff_context.linear_out" => whole(format!("{b}.txt_mlp.2.{suffix}")),
            _ => None,
        },
        &|b, inner, suffix| match inner {
            "attn.to_qkv_mlp_proj" => whole(format!("{b}.linear1.{suffix}")),
            "attn.to_out" => whole(format!("{b}.linear2.{suffix}")),
            "attn.norm_q" => whole(format!("{b}.norm.query_norm.scale")),
            "attn.norm_k" => whole(format!("{b}.norm.key_norm.scale")),
            _ => None,
        },
    )
}

/// The latent-diffusion name of a diffusers VAE decoder tensor (diffusers'
/// `convert_ldm_vae_checkpoint`, inverted).
pub(super) fn bfl_vae_source(name: &str, up_blocks: usize) -> Option<Source> {
    let resnet = |s: &str| s.replace("conv_shortcut", "nin_shortcut");
    let (coder, rest) = name.split_once('.')?;
    let mapped = if let Some(rest) = rest.strip_prefix("mid_block.") {
        if let Some(r) = rest.strip_prefix("resnets.") {
            let (i, inner) = r.split_once('.')?;
            let block = if i == "0" { "block_1" } else { "block_2" };
            format!("{coder}.mid.{block}.{}", resnet(inner))
        } else {
            let inner = rest.strip_prefix("attentions.0.")?;
            let (stem, suffix) = inner.rsplit_once('.')?;
            let to = match stem {
                "group_norm" => "norm",
                "to_q" => "q",
                "to_k" => "k",
                "to_v" => "v",
                "to_out.0" => "proj_out",
                _ => return None,
            };
            format!("{coder}.mid.attn_1.{to}.{suffix}")
        }
    } else if let Some(rest) = name.strip_prefix("decoder.up_blocks.") {
        let (i, inner) = rest.split_once('.')?;
        let level = up_blocks
            .checked_sub(1)?
            .checked_sub(i.parse::<usize>().ok()?)?;
        if let Some(r) = inner.strip_prefix("resnets.") {
            format!("decoder.up.{level}.block.{}", resnet(r))
        } else {
            let r = inner.strip_prefix("upsamplers.0.")?;
            format!("decoder.up.{level}.upsample.{r}")
        }
    } else if let Some(rest) = name.strip_prefix("encoder.down_blocks.") {
        let (i, inner) = rest.split_once('.')?;
        if let Some(r) = inner.strip_prefix("resnets.") {
            format!("encoder.down.{i}.block.{}", resnet(r))
        } else {
            let r = inner.strip_prefix("downsamplers.0.")?;
            format!("encoder.down.{i}.downsample.{r}")
        }
    } else if let Some(rest) = rest.strip_prefix("conv_norm_out.") {
        format!("{coder}.norm_out.{rest}")
    } else if coder == "quant_conv" {
        // FLUX.2's autoencoder keeps its quant convolutions inside the coders.
        format!("encoder.quant_conv.{rest}")
    } else if coder == "post_quant_conv" {
        format!("decoder.post_quant_conv.{rest}")
    } else {
        name.to_string()
    };
    Some(Source {
        name: mapped,
        rows: None,
    })
}
