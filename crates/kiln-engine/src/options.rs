//! How a checkpoint is loaded (device, precision) and what loading and sampling report, shared
//! by every model family. Both choices parse from the strings operators write (`cuda:1`,
//! `bf16`) through [`FromStr`], which the configuration's serde and the CLI's flags both use.

use crate::error::{Error, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// A CUDA device by ordinal (`"cuda"` is `"cuda:0"`); needs the `cuda` feature.
    Cuda(usize),
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("device {other:?}: expected cpu, cuda or cuda:N")),
        }
    }
}

impl From<DeviceSpec> for String {
    fn from(device: DeviceSpec) -> Self {
        device.to_string()
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

/// Compute precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum Precision {
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::Bf16, Precision::F16];

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("precision {s:?}: expected f32, bf16 or f16"))
    }
}

impl From<Precision> for String {
    fn from(p: Precision) -> Self {
        p.as_str().to_string()
    }
}

impl TryFrom<String> for Precision {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

/// How to load a checkpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineOptions {
    pub device: DeviceSpec,
    /// `None`: the device's best ([`EngineOptions::precision`]).
    pub precision: Option<Precision>,
}

/// How a model's dense linear layers keep their weights and multiply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Products {
    /// Weights in the compute dtype, multiplied in it (by kiln's f32 kernels on the CPU, by
    /// candle's elsewhere).
    Native,
    /// On the CPU in bf16: weights (and the VAE's Winograd-transformed 3x3 filters) packed once
    /// in bf16 tiles, the products of every linear layer, of the transformer's and the VAE's
    /// attention and of the VAE's 3x3 convolutions on the CPU's bf16 instructions with f32 sums
    /// (`kiln_kernels::bf16`), while activations, norms, softmax and the sampler stay f32.
    CpuBf16,
}

/// What a checkpoint is loaded for: device, activations' dtype, and how products run.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub device: Device,
    pub dtype: DType,
    pub products: Products,
}

impl Runtime {
    /// `x` on this device in this dtype.
    pub(crate) fn put(&self, x: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        Ok(x.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// E.g. "F32" or "BF16", and for the CPU's bf16 products their kernel.
    pub fn describe(&self) -> String {
        match self.products {
            Products::Native => format!("{:?}", self.dtype),
            Products::CpuBf16 => format!(
                "BF16 weights and products on {}, f32 activations",
                crate::cpu_bf16_kernel().unwrap_or("no kernel")
            ),
        }
    }
}

impl EngineOptions {
    /// The precision the checkpoint loads in: the configured one, else bf16 on CUDA and on a
    /// CPU whose bf16 products beat its f32 ones (AMX tiles; AVX512-BF16 on AMD), f32 on other
    /// CPUs. (An Intel CPU with AVX512-BF16 but no AMX can be configured for bf16, which halves
    /// the weights' memory, but runs kiln's AVX512-BF16 kernel slower than its f32 products:
    /// [`kiln_kernels::bf16::beats_f32`].)
    pub fn precision(&self) -> Precision {
        self.precision.unwrap_or(match self.device {
            DeviceSpec::Cuda(_) => Precision::Bf16,
            DeviceSpec::Cpu if kiln_kernels::bf16::beats_f32() => Precision::Bf16,
            DeviceSpec::Cpu => Precision::F32,
        })
    }

    /// Refuses a precision this machine cannot run (bf16 on a CPU without bf16 instructions),
    /// saying what to do instead: checked when the configuration is read, and again at load.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.device == DeviceSpec::Cpu
            && self.precision() == Precision::Bf16
            && kiln_kernels::bf16::kernel().is_none()
        {
            return Err(
                "bf16 on the CPU needs AMX-BF16 or AVX512-BF16 instructions, which \
                        this CPU does not have; use precision = \"f32\""
                    .into(),
            );
        }
        Ok(())
    }

    /// The device, dtype and products to load in, or a message that says what is missing:
    /// checked when a checkpoint loads, so a worker with a bad `device` or `precision` fails
    /// at start, never mid-generation.
    pub fn runtime(&self) -> Result<Runtime> {
        self.check().map_err(|message| Error::Device {
            device: self.device.to_string(),
            message,
            source: None,
        })?;
        let device = match self.device {
            DeviceSpec::Cpu => Device::Cpu,
            DeviceSpec::Cuda(i) => cuda_device(i)?,
        };
        let (dtype, products) = match (self.device, self.precision()) {
            (DeviceSpec::Cpu, Precision::Bf16) => (DType::F32, Products::CpuBf16),
            (_, Precision::F32) => (DType::F32, Products::Native),
            (_, Precision::Bf16) => (DType::BF16, Products::Native),
            (_, Precision::F16) => (DType::F16, Products::Native),
        };
        Ok(Runtime {
            device,
            dtype,
            products,
        })
    }
}

/// The free memory of `device` as its driver reports it now, in bytes: what a worker's memory
/// budget on a GPU starts from. `None` for the CPU, whose budget is configured or none.
pub fn free_memory(device: DeviceSpec) -> Result<Option<u64>> {
    match device {
        DeviceSpec::Cpu => Ok(None),
        DeviceSpec::Cuda(ordinal) => cuda_free_memory(ordinal).map(Some),
    }
}

#[cfg(feature = "cuda")]
fn cuda_free_memory(ordinal: usize) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::result::mem_get_info;
    let Device::Cuda(cuda) = cuda_device(ordinal)? else {
        unreachable!("cuda_device opens a CUDA device")
    };
    let device_error = |message: String| Error::Device {
        device: DeviceSpec::Cuda(ordinal).to_string(),
        message,
        source: None,
    };
    // The driver answers for the context current on this thread.
    cuda.cuda_stream()
        .context()
        .bind_to_thread()
        .map_err(|e| device_error(format!("binding the device's context: {e}")))?;
    let (free, _total) =
        mem_get_info().map_err(|e| device_error(format!("reading its free memory: {e}")))?;
    Ok(free as u64)
}

#[cfg(not(feature = "cuda"))]
fn cuda_free_memory(ordinal: usize) -> Result<u64> {
    cuda_device(ordinal).map(|_| 0)
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| Error::Device {
        device: DeviceSpec::Cuda(ordinal).to_string(),
        message: format!(
            "CUDA device {ordinal} cannot be opened (is the NVIDIA driver installed, and does \
             `nvidia-smi` list a GPU {ordinal}?): {e}"
        ),
        source: Some(Box::new(e)),
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Err(Error::Device {
        device: DeviceSpec::Cuda(ordinal).to_string(),
        message: "this kiln was built without CUDA; build it with `--features cuda` \
                  (README: CUDA) or use device = \"cpu\""
            .into(),
        source: None,
    })
}

/// Loading progress: `done` of `total` units of a component (the transformer counts blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadProgress {
    pub component: &'static str,
    pub done: usize,
    pub total: usize,
}

impl LoadProgress {
    /// `component` loaded whole.
    pub(crate) fn whole(component: &'static str) -> Self {
        Self {
            component,
            done: 1,
            total: 1,
        }
    }
}

/// Sampling settings used when a request does not say.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingDefaults {
    pub steps: u32,
    /// `None` where the checkpoint takes no guidance (schnell, distilled klein).
    pub guidance: Option<f32>,
    pub max_sequence_length: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_precisions_parse_and_print_alike() {
        for s in ["cpu", "cuda:0", "cuda:3"] {
            assert_eq!(s.parse::<DeviceSpec>().unwrap().to_string(), s);
        }
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert!("gpu"
            .parse::<DeviceSpec>()
            .unwrap_err()
            .contains("cpu, cuda or cuda:N"));
        for p in Precision::ALL {
            assert_eq!(p.to_string().parse::<Precision>(), Ok(p));
        }
        assert!("fp8"
            .parse::<Precision>()
            .unwrap_err()
            .contains("f32, bf16 or f16"));
        let p: Precision = serde_json::from_str("\"bf16\"").unwrap();
        assert_eq!(p, Precision::Bf16);
    }
}
