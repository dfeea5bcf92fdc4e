//! The flow-matching sampler: noise, latent packing, the (shifted) schedule, Euler steps.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use kiln_core::engine::{RgbImage, StepEvent, StepObserver};
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use std::ops::ControlFlow;

/// The schedule's time shift, as diffusers' `scheduler/scheduler_config.json` describes it
/// (`FlowMatchEulerDiscreteScheduler`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ScheduleConfig {
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default = "one")]
    pub shift: f64,
    #[serde(default = "base_shift")]
    pub base_shift: f64,
    #[serde(default = "max_shift")]
    pub max_shift: f64,
    #[serde(default = "base_len")]
    pub base_image_seq_len: usize,
    #[serde(default = "max_len")]
    pub max_image_seq_len: usize,
}

fn one() -> f64 {
    1.0
}
fn base_shift() -> f64 {
    0.5
}
fn max_shift() -> f64 {
    1.15
}
fn base_len() -> usize {
    256
}
fn max_len() -> usize {
    4096
}

impl ScheduleConfig {
    /// BFL's rule for files that carry no scheduler configuration: dev shifts with the image
    /// size, schnell does not shift.
    pub(crate) fn for_guidance_distilled(dev: bool) -> Self {
        Self {
            use_dynamic_shifting: dev,
            shift: 1.0,
            base_shift: base_shift(),
            max_shift: max_shift(),
            base_image_seq_len: base_len(),
            max_image_seq_len: max_len(),
        }
    }

    /// The `steps + 1` noise levels from 1 down to 0 for FLUX.1, whose `mu` grows linearly
    /// with the image's token count between the configured bounds.
    pub fn sigmas(&self, steps: usize, image_seq_len: usize) -> Vec<f32> {
        let m = (self.max_shift - self.base_shift)
            / (self.max_image_seq_len as f64 - self.base_image_seq_len as f64);
        let mu = image_seq_len as f64 * m + (self.base_shift - m * self.base_image_seq_len as f64);
        self.sigmas_with_mu(steps, mu)
    }

    /// The `steps + 1` noise levels from 1 down to 0, computed as diffusers does: a float64
    /// linspace cast to f32, then the shift in f32 (`mu` itself in float64). `mu` is used only
    /// with dynamic shifting; otherwise the static `shift` applies.
    pub fn sigmas_with_mu(&self, steps: usize, mu: f64) -> Vec<f32> {
        // numpy's linspace(1, 1/n, n): `i * step + start`, the end point exact.
        let n = steps as f64;
        let step = if steps > 1 {
            (1.0 / n - 1.0) / (n - 1.0)
        } else {
            0.0
        };
        let base: Vec<f32> = (0..steps)
            .map(|i| if i + 1 == steps { 1.0 / n } else { i as f64 * step + 1.0 } as f32)
            .collect();
        let mut sigmas: Vec<f32> = if self.use_dynamic_shifting {
            let e = mu.exp() as f32;
            base.iter().map(|&t| e / (e + (1.0 / t - 1.0))).collect()
        } else {
            let s = self.shift as f32;
            base.iter()
                .map(|&t| s * t / (1.0 + (s - 1.0) * t))
                .collect()
        };
        sigmas.push(0.0);
        sigmas
    }
}

/// Rounds an f32 to the compute dtype and back, as PyTorch does when a value passes through a
/// tensor of that dtype.
pub(crate) fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// The transformer's timestep input for noise level `sigma`, with diffusers' round trip:
/// `t = sigma * 1000` (f32), cast to the latents' dtype, divided by 1000 by the pipeline and
/// multiplied by 1000 again inside the transformer.
pub(crate) fn model_timestep(sigma: f32, dtype: DType) -> f32 {
    let t = round_to(dtype, sigma * 1000.0);
    let t = round_to(dtype, t / 1000.0);
    round_to(dtype, t * 1000.0)
}

/// The guidance input: the f32 guidance scale cast to the model dtype, times 1000.
pub(crate) fn model_guidance(g: f32, dtype: DType) -> f32 {
    round_to(dtype, round_to(dtype, g) * 1000.0)
}

/// Latent grid (height, width) for an image: `2 * (pixels / (vae_scale * 2))`.
pub fn latent_grid(width: usize, height: usize, vae_scale: usize) -> (usize, usize) {
    (
        2 * (height / (vae_scale * 2)),
        2 * (width / (vae_scale * 2)),
    )
}

/// [`latent_grid`] for a request, or why its size is unusable: sides must be positive
/// multiples of `2 * vae_scale` (a latent pixel per `vae_scale` pixels, 2x2 latent patches).
pub(crate) fn checked_latent_grid(
    width: u32,
    height: u32,
    vae_scale: usize,
) -> Result<(usize, usize)> {
    let m = (vae_scale * 2) as u32;
    if width == 0 || height == 0 || !width.is_multiple_of(m) || !height.is_multiple_of(m) {
        return Err(Error::InvalidRequest(format!(
            "width and height must be positive multiples of {m} for this checkpoint (got {width}x{height})"
        )));
    }
    Ok(latent_grid(width as usize, height as usize, vae_scale))
}

/// A request's step count, or the default; at least one.
pub(crate) fn checked_steps(requested: Option<u32>, default: u32) -> Result<u32> {
    match requested.unwrap_or(default) {
        0 => Err(Error::InvalidRequest(
            "num_inference_steps must be at least 1".into(),
        )),
        n => Ok(n),
    }
}

/// Standard-normal noise `(1, channels, h, w)` in f32 from a seed: ChaCha8 and Box-Muller, the
/// same numbers on every machine and device.
pub fn noise(seed: u64, channels: usize, h: usize, w: usize) -> Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = channels * h * w;
    let mut v = Vec::with_capacity(n + 1);
    while v.len() < n {
        // 1 - u lies in (0, 1], so the logarithm is finite.
        let u1: f64 = 1.0 - rng.gen::<f64>();
        let u2: f64 = rng.gen();
        let r = (-2.0 * u1.ln()).sqrt();
        let a = std::f64::consts::TAU * u2;
        v.push((r * a.cos()) as f32);
        v.push((r * a.sin()) as f32);
    }
    v.truncate(n);
    Ok(Tensor::from_vec(v, (1, channels, h, w), &Device::Cpu)?)
}

/// `b c (h 2) (w 2) -> b (h w) (c 2 2)`.
pub fn pack(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / 2) * (w / 2), c * 4))?)
}

/// The inverse of [`pack`] for a latent grid of `h x w`.
pub fn unpack(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, cp) = x.dims3()?;
    let c = cp / 4;
    Ok(x.reshape((b, h / 2, w / 2, c, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, c, h, w))?)
}

/// One Euler step `x + (sigma_next - sigma) * v`, in f32 and cast back (diffusers'
/// `FlowMatchEulerDiscreteScheduler.step`).
pub(crate) fn euler_step(x: &Tensor, v: &Tensor, sigma: f32, sigma_next: f32) -> Result<Tensor> {
    let dtype = v.dtype();
    let dt = (sigma_next - sigma) as f64;
    let xf = x.to_dtype(DType::F32)?;
    let vf = v.to_dtype(DType::F32)?;
    Ok((xf + (vf * dt)?)?.to_dtype(dtype)?)
}

/// True classifier-free guidance: the unconditional velocity `uncond` moved `scale` times as
/// far towards the conditional one `cond`.
pub(crate) fn guided(cond: &Tensor, uncond: &Tensor, scale: f32) -> Result<Tensor> {
    Ok((uncond + ((cond - uncond)? * scale as f64)?)?)
}

/// Ends a generation whose observer asks to stop, between the phases where no step fires.
pub(crate) fn check_stop(observer: &mut dyn StepObserver) -> Result<()> {
    if observer.stop_requested() {
        return Err(Error::Interrupted);
    }
    Ok(())
}

/// The Euler loop over `sigmas`: `velocity(x, sigma)` at each level but the last; after each
/// step the observer is told (and may stop the run), with a preview every `preview_interval`
/// steps but the last, made by `preview_of` from the clean estimate `x0 = x - sigma v` in f32.
pub(crate) fn denoise(
    mut latents: Tensor,
    sigmas: &[f32],
    preview_interval: u32,
    observer: &mut dyn StepObserver,
    velocity: &mut dyn FnMut(&Tensor, f32) -> Result<Tensor>,
    preview_of: &dyn Fn(&Tensor) -> Result<Option<RgbImage>>,
) -> Result<Tensor> {
    let steps = sigmas.len() - 1;
    for i in 0..steps {
        let v = velocity(&latents, sigmas[i])?;
        let want_preview =
            preview_interval > 0 && (i + 1) % preview_interval as usize == 0 && i + 1 < steps;
        let shown = if want_preview {
            let x0 =
                (latents.to_dtype(DType::F32)? - (v.to_dtype(DType::F32)? * sigmas[i] as f64)?)?;
            preview_of(&x0)?
        } else {
            None
        };
        latents = euler_step(&latents, &v, sigmas[i], sigmas[i + 1])?;
        let event = StepEvent {
            step: i as u32 + 1,
            total: steps as u32,
            preview: shown.as_ref(),
        };
        if let ControlFlow::Break(()) = observer.on_step(event) {
            return Err(Error::Interrupted);
        }
    }
    Ok(latents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trips() {
        let x = Tensor::arange(0f32, 16.0 * 4.0 * 6.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 16, 4, 6))
            .unwrap();
        let p = pack(&x).unwrap();
        assert_eq!(p.dims(), &[1, 6, 64]);
        let back = unpack(&p, 4, 6).unwrap();
        let diff = (back - &x)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn schnell_schedule_is_unshifted_linspace() {
        let s = ScheduleConfig::for_guidance_distilled(false).sigmas(4, 4096);
        assert_eq!(s, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
    }

    #[test]
    fn dev_schedule_shifts_towards_noise() {
        let s = ScheduleConfig::for_guidance_distilled(true).sigmas(4, 4096);
        assert_eq!(s[0], 1.0);
        // mu = 1.15 at 4096 tokens: t' = e^mu / (e^mu + 1/t - 1).
        let e = 1.15f64.exp();
        assert!((s[2] as f64 - e / (e + 1.0)).abs() < 1e-6);
        assert_eq!(*s.last().unwrap(), 0.0);
    }

    #[test]
    fn noise_is_seeded_and_standard() {
        let a = noise(7, 16, 8, 8)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = noise(7, 16, 8, 8)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let c = noise(8, 16, 8, 8)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let var = a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / a.len() as f32;
        assert!(
            mean.abs() < 0.15 && (var - 1.0).abs() < 0.2,
            "mean {mean} var {var}"
        );
    }
}
