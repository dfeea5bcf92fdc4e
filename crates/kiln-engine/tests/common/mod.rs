//! What the parity tests share: the committed reference outputs and how they are compared.

use candle_core::{DType, Device, Tensor};
use kiln_core::engine::{StepEvent, StepObserver};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

/// f32 tolerance for the text encoders, one transformer call and the final latents.
pub const TOL: f32 = 1e-4;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `{config}-reference.safetensors` and `{config}-reference.json`, as the reference scripts
/// in tools/reference write them.
pub struct Reference {
    pub tensors: HashMap<String, Tensor>,
    pub json: serde_json::Value,
}

impl Reference {
    pub fn load(config: &str) -> Self {
        let dir = fixtures();
        let tensors = candle_core::safetensors::load(
            dir.join(format!("{config}-reference.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let json = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{config}-reference.json"))).unwrap(),
        )
        .unwrap();
        Self { tensors, json }
    }
    pub fn t(&self, name: &str) -> &Tensor {
        &self.tensors[name]
    }
    pub fn ids(&self, name: &str) -> Vec<u32> {
        self.t(name)
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|i| i as u32)
            .collect()
    }
    pub fn u32(&self, key: &str) -> u32 {
        self.json[key].as_u64().unwrap() as u32
    }
}

pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    let a = a
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    max_abs_of(&(a - b).unwrap())
}

pub fn max_abs_of(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The largest difference between two images' 8-bit channels.
pub fn max_pixel_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len(), "image sizes differ");
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

pub struct Quiet;
impl StepObserver for Quiet {
    fn on_step(&mut self, _: StepEvent<'_>) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}
