//! Tensors read from checkpoint files, memory-mapped: safetensors (one file or shards) and GGUF.
//!
//! The model code asks for tensors by their diffusers names. A [`NameMap`] says where each one
//! is stored: under the same name, or, for BFL single files and GGUF files (which keep BFL's
//! names), under a fused BFL tensor of which it is a set of rows (`qkv` split in three, the
//! final layer's modulation with its halves swapped). Rows are cut from the mapped bytes, so a
//! quantized tensor stays quantized: a row of a GGUF block-quantized matrix is whole blocks.
//! Every tensor is converted straight from the mapped pages into its device storage.

use crate::error::{Error, Result};
use crate::layers::{Conv2d, Linear};
use crate::options::{Products, Runtime};
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::ops::Range;
use std::path::{Path, PathBuf};

enum Storage {
    Safetensors(MmapedSafetensors),
    Gguf {
        mmap: memmap2::Mmap,
        content: gguf_file::Content,
    },
}

#[derive(Clone, Copy, Debug)]
enum Encoding {
    Dense(DType),
    Quantized(GgmlDType),
}

struct Raw<'a> {
    encoding: Encoding,
    shape: Vec<usize>,
    bytes: Cow<'a, [u8]>,
}

/// Where a diffusers-named tensor is stored: a stored name and, when it is part of a fused
/// tensor, the row ranges (first dimension) to take, in order.
struct Source {
    name: String,
    rows: Option<Vec<Range<usize>>>,
}

mod names;
use names::{bfl_flux2_transformer_source, bfl_transformer_source, bfl_vae_source};

/// How diffusers names map to stored names.
#[derive(Debug, Clone)]
pub(crate) enum NameMap {
    Identity,
    /// BFL's FLUX.1 transformer names, optionally under a prefix (ComfyUI's full checkpoints keep
    /// `model.diffusion_model.`). `hidden` and `mlp` size the fused tensors' parts.
    BflTransformer {
        prefix: String,
        hidden: usize,
        mlp: usize,
    },
    /// BFL's FLUX.2 transformer names (diffusers' `convert_flux2_transformer_checkpoint_to_diffusers`
    /// inverted), optionally under a prefix; `hidden` sizes the fused qkv's parts.
    BflFlux2Transformer {
        prefix: String,
        hidden: usize,
    },
    /// BFL's `ae.safetensors` of FLUX.1 or FLUX.2 (the original latent-diffusion names, FLUX.2's
    /// quant convolutions inside the coders); `up_blocks` is the number of decoder levels, whose
    /// order BFL reverses.
    BflVae {
        up_blocks: usize,
    },
}

pub(crate) struct Weights {
    storage: Storage,
    map: NameMap,
    path: PathBuf,
    device: Device,
    dtype: DType,
    products: Products,
}

impl Weights {
    /// Maps safetensors files (several for a sharded checkpoint) for tensors as `rt` computes.
    pub(crate) fn open_safetensors(paths: &[PathBuf], rt: &Runtime) -> Result<Self> {
        let first = paths.first().cloned().unwrap_or_default();
        // SAFETY: the files are mapped read-only; like every program that maps model files we
        // rely on nobody truncating them while the model is loaded.
        let st = unsafe { MmapedSafetensors::multi(paths) }
            .map_err(|e| Error::checkpoint(&first, format!("cannot map safetensors: {e}")))?;
        Ok(Self {
            storage: Storage::Safetensors(st),
            map: NameMap::Identity,
            path: first,
            device: rt.device.clone(),
            dtype: rt.dtype,
            products: rt.products,
        })
    }

    pub(crate) fn open_gguf(path: &Path, rt: &Runtime) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: as for safetensors, a read-only mapping of a file nobody rewrites meanwhile.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let content = gguf_file::Content::read(&mut std::io::Cursor::new(&mmap[..]))
            .map_err(|e| Error::checkpoint(path, format!("not a readable GGUF file: {e}")))?;
        Ok(Self {
            storage: Storage::Gguf { mmap, content },
            map: NameMap::Identity,
            path: path.to_path_buf(),
            device: rt.device.clone(),
            dtype: rt.dtype,
            products: rt.products,
        })
    }

    pub(crate) fn with_map(mut self, map: NameMap) -> Self {
        self.map = map;
        self
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The names as stored, for inferring a configuration from what the file holds.
    pub(crate) fn stored_names(&self) -> BTreeSet<String> {
        match &self.storage {
            Storage::Safetensors(st) => st.tensors().into_iter().map(|(n, _)| n).collect(),
            Storage::Gguf { content, .. } => content.tensor_infos.keys().cloned().collect(),
        }
    }

    /// The shape of a tensor as stored (torch order), if present.
    pub(crate) fn stored_shape(&self, stored: &str) -> Option<Vec<usize>> {
        match &self.storage {
            Storage::Safetensors(st) => st.get(stored).ok().map(|v| v.shape().to_vec()),
            Storage::Gguf { content, .. } => content
                .tensor_infos
                .get(stored)
                .map(|i| i.shape.dims().to_vec()),
        }
    }

    /// What precedes BFL's transformer names in this file: nothing, or ComfyUI's
    /// `model.diffusion_model.`. A file with `img_in.weight` under neither (and, as callers ask
    /// only once diffusers' names were not found, under no name they know) is no `family`
    /// transformer.
    pub(crate) fn bfl_prefix(&self, family: &str) -> Result<&'static str> {
        ["", "model.diffusion_model."]
            .into_iter()
            .find(|p| self.stored_shape(&format!("{p}img_in.weight")).is_some())
            .ok_or_else(|| {
                Error::checkpoint(
                    self.path(),
                    format!(
                        "not a {family} transformer: neither diffusers' nor BFL's tensor names"
                    ),
                )
            })
    }

    /// Whether the checkpoint holds the (diffusers-named) tensor.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.source(name)
            .is_some_and(|s| self.stored_shape(&s.name).is_some())
    }

    /// The shape of the (diffusers-named) tensor, after any row selection.
    pub(crate) fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.raw(name)?.shape)
    }

    /// A dense tensor in the compute dtype on the compute device (quantized ones dequantized).
    pub(crate) fn tensor(&self, name: &str) -> Result<Tensor> {
        let raw = self.raw(name)?;
        let t = match raw.encoding {
            Encoding::Dense(dtype) => dense_from_bytes(dtype, &raw.bytes, &raw.shape)?,
            Encoding::Quantized(q) => {
                quantized(q, &raw.bytes, &raw.shape, &Device::Cpu)?.dequantize(&Device::Cpu)?
            }
        };
        Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?)
    }

    /// `{prefix}.weight` and, if stored, `{prefix}.bias` as a linear layer. Block-quantized
    /// weights stay quantized and are multiplied by candle's quantized kernels; dense ones are
    /// packed in bf16 where the products are the CPU's bf16 ones.
    pub(crate) fn linear(&self, prefix: &str) -> Result<Linear> {
        let w_name = format!("{prefix}.weight");
        let b_name = format!("{prefix}.bias");
        let bias = if self.contains(&b_name) {
            Some(self.tensor(&b_name)?)
        } else {
            None
        };
        let raw = self.raw(&w_name)?;
        match raw.encoding {
            Encoding::Quantized(q) => {
                let qt = quantized(q, &raw.bytes, &raw.shape, &self.device)?;
                Ok(Linear::quantized(QMatMul::from_qtensor(qt)?, bias))
            }
            Encoding::Dense(_) => self.dense_linear(self.tensor(&w_name)?, bias),
        }
    }

    /// A linear layer from a dense `(out, in)` weight read (and reshaped) by the caller,
    /// packed in bf16 where the products are the CPU's bf16 ones.
    pub(crate) fn dense_linear(&self, weight: Tensor, bias: Option<Tensor>) -> Result<Linear> {
        Ok(match self.products {
            Products::Native => Linear::dense(weight, bias),
            Products::CpuBf16 => Linear::packed_bf16(&weight, bias)?,
        })
    }

    /// `{prefix}.weight` and `{prefix}.bias` as a 2-D convolution, whose 3x3 filters are packed
    /// in bf16 where the products are the CPU's bf16 ones.
    pub(crate) fn conv2d(&self, prefix: &str, padding: usize, stride: usize) -> Result<Conv2d> {
        let weight = self.tensor(&format!("{prefix}.weight"))?;
        let bias = self.tensor(&format!("{prefix}.bias"))?;
        Ok(match self.products {
            Products::Native => Conv2d::new(weight, bias, padding, stride),
            Products::CpuBf16 => Conv2d::packed_bf16(weight, bias, padding, stride)?,
        })
    }

    fn source(&self, name: &str) -> Option<Source> {
        match &self.map {
            NameMap::Identity => Some(Source {
                name: name.to_string(),
                rows: None,
            }),
            NameMap::BflTransformer {
                prefix,
                hidden,
                mlp,
            } => bfl_transformer_source(name, *hidden, *mlp).map(|mut s| {
                s.name = format!("{prefix}{}", s.name);
                s
            }),
            NameMap::BflFlux2Transformer { prefix, hidden } => {
                bfl_flux2_transformer_source(name, *hidden).map(|mut s| {
                    s.name = format!("{prefix}{}", s.name);
                    s
                })
            }
            NameMap::BflVae { up_blocks } => bfl_vae_source(name, *up_blocks),
        }
    }

    fn raw(&self, name: &str) -> Result<Raw<'_>> {
        let missing = || Error::checkpoint(&self.path, format!("missing tensor {name}"));
        let source = self.source(name).ok_or_else(missing)?;
        let whole = match &self.storage {
            Storage::Safetensors(st) => {
                let view = st.get(&source.name).map_err(|_| missing())?;
                let dtype = DType::try_from(view.dtype()).map_err(|e| {
                    Error::checkpoint(&self.path, format!("tensor {}: {e}", source.name))
                })?;
                Raw {
                    encoding: Encoding::Dense(dtype),
                    shape: view.shape().to_vec(),
                    bytes: Cow::Borrowed(view.data()),
                }
            }
            Storage::Gguf { mmap, content } => {
                let info = content.tensor_infos.get(&source.name).ok_or_else(missing)?;
                let elems = info.shape.elem_count();
                let size = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
                let start = (content.tensor_data_offset + info.offset) as usize;
                let bytes = mmap.get(start..start + size).ok_or_else(|| {
                    Error::checkpoint(&self.path, format!("tensor {} is truncated", source.name))
                })?;
                let encoding = match info.ggml_dtype {
                    GgmlDType::F32 => Encoding::Dense(DType::F32),
                    GgmlDType::F16 => Encoding::Dense(DType::F16),
                    GgmlDType::BF16 => Encoding::Dense(DType::BF16),
                    q => Encoding::Quantized(q),
                };
                Raw {
                    encoding,
                    shape: info.shape.dims().to_vec(),
                    bytes: Cow::Borrowed(bytes),
                }
            }
        };
        match source.rows {
            None => Ok(whole),
            Some(rows) => self.select_rows(whole, &rows, &source.name),
        }
    }

    fn select_rows<'a>(
        &self,
        raw: Raw<'a>,
        rows: &[Range<usize>],
        stored: &str,
    ) -> Result<Raw<'a>> {
        let n = raw.shape.first().copied().unwrap_or(0);
        if n == 0 || !raw.bytes.len().is_multiple_of(n) || rows.iter().any(|r| r.end > n) {
            return Err(Error::checkpoint(
                &self.path,
                format!(
                    "tensor {stored} of shape {:?} cannot be split into rows {rows:?}",
                    raw.shape
                ),
            ));
        }
        let row_bytes = raw.bytes.len() / n;
        let total: usize = rows.iter().map(|r| r.len()).sum();
        let bytes = if let [r] = rows {
            match raw.bytes {
                Cow::Borrowed(b) => Cow::Borrowed(&b[r.start * row_bytes..r.end * row_bytes]),
                Cow::Owned(b) => Cow::Owned(b[r.start * row_bytes..r.end * row_bytes].to_vec()),
            }
        } else {
            let mut out = Vec::with_capacity(total * row_bytes);
            for r in rows {
                out.extend_from_slice(&raw.bytes[r.start * row_bytes..r.end * row_bytes]);
            }
            Cow::Owned(out)
        };
        let mut shape = raw.shape;
        shape[0] = total;
        Ok(Raw {
            encoding: raw.encoding,
            shape,
            bytes,
        })
    }
}

/// A dense tensor on the CPU from little-endian bytes of any alignment.
fn dense_from_bytes(dtype: DType, bytes: &[u8], shape: &[usize]) -> candle_core::Result<Tensor> {
    fn collect<T, const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
        bytes
            .chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunk of N bytes")))
            .collect()
    }
    let cpu = &Device::Cpu;
    let t = match dtype {
        DType::F32 => Tensor::from_vec(collect(bytes, f32::from_le_bytes), shape, cpu)?,
        DType::F16 => Tensor::from_vec(collect(bytes, half::f16::from_le_bytes), shape, cpu)?,
        DType::BF16 => Tensor::from_vec(collect(bytes, half::bf16::from_le_bytes), shape, cpu)?,
        DType::F64 => Tensor::from_vec(collect(bytes, f64::from_le_bytes), shape, cpu)?,
        other => candle_core::bail!("unsupported weight dtype {other:?}"),
    };
    Ok(t)
}

fn quantized(dtype: GgmlDType, bytes: &[u8], shape: &[usize], device: &Device) -> Result<QTensor> {
    // candle reads blocks in place and needs them aligned; the mapped file keeps GGUF's
    // alignment, rows cut and glued together are copied into an aligned buffer first.
    let align = 4;
    let storage = if (bytes.as_ptr() as usize).is_multiple_of(align) {
        QStorage::from_data(Cow::Borrowed(bytes), device, dtype)?
    } else {
        let mut words = vec![0u32; bytes.len().div_ceil(4)];
        for (w, c) in words.iter_mut().zip(bytes.chunks(4)) {
            let mut b = [0u8; 4];
            b[..c.len()].copy_from_slice(c);
            *w = u32::from_ne_bytes(b);
        }
        // SAFETY: `words` holds at least `bytes.len()` initialised bytes, read as u8.
        let aligned =
            unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), bytes.len()) };
        QStorage::from_data(Cow::Borrowed(aligned), device, dtype)?
    };
    Ok(QTensor::new(storage, shape)?)
}
