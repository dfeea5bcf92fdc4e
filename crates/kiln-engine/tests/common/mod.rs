//! What the parity tests share: the committed reference outputs and how they are compared.

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// f32 tolerance for the text encoders, one transformer call and the final latents.
pub const TOL: f32 = 1e-4;

/// f32 on the CPU: what the references were computed in, so what parity is measured in (the
/// default is bf16 on a CPU with bf16 instructions; its cases say so).
pub fn f32_options() -> kiln_engine::EngineOptions {
    kiln_engine::EngineOptions {
        precision: Some(kiln_engine::Precision::F32),
        ..Default::default()
    }
}

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

/// A GGUF copy of a BFL-named transformer file with every 2-D weight whose rows are whole
/// `dtype` blocks quantized (the others F32), as converters do, written with candle's GGUF
/// writer. Returns the quantized tensors' names.
pub fn quantize_to_gguf(src: &Path, dtype: GgmlDType, out: &Path) -> Vec<String> {
    let tensors = candle_core::safetensors::load(src, &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut quantized = Vec::new();
    let q: Vec<(String, QTensor)> = names
        .into_iter()
        .map(|n| {
            let t = tensors[n].to_dtype(DType::F32).unwrap();
            let whole_blocks = t.rank() == 2 && t.dims()[1].is_multiple_of(dtype.block_size());
            if whole_blocks {
                quantized.push(n.clone());
            }
            (
                n.clone(),
                QTensor::quantize(&t, if whole_blocks { dtype } else { GgmlDType::F32 }).unwrap(),
            )
        })
        .collect();
    let refs: Vec<(&str, &QTensor)> = q.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut f = std::fs::File::create(out).unwrap();
    gguf_file::write(&mut f, &[], &refs).unwrap();
    quantized
}
