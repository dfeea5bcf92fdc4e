//! kiln's CPU kernels: what the engine's f32 layers spend their time in on a CPU.
//!
//! # Layout
//! - [`gemm`]: f32 matrix products on strided views, by OpenBLAS when the machine has
//!   `libopenblas.so.0` (loaded at run time) and by the gemm crate otherwise.
//! - [`bf16`]: bf16 matrix products with f32 accumulation on AMX tiles or AVX512-BF16, the
//!   right operand packed once (a linear layer's weight at load).
//! - `attention`: softmax attention a block of queries at a time, so memory stays linear in
//!   the tokens, both of its products on [`gemm`].
//! - `pointwise`: the memory-bound layers between the products, fused into one parallel pass
//!   each (GELU, adaLN, gated residual, GroupNorm + SiLU).
//! - `winograd`: 3x3 convolutions by Winograd's F(2x2, 3x3), 4/9 of the direct products.
//! - `simd`: run-time AVX-512 / AVX2 dispatch for those loops, and their exponential.
//! - [`ops`]: all of them as candle ops ([`ops::linear`], [`ops::attention`], [`ops::conv2d`],
//!   [`ops::group_norm`], ...).
//!
//! Everything here is exercised by the engine's parity tests as well as its own.

mod attention;
pub mod bf16;
pub mod gemm;
pub mod ops;
mod pointwise;
mod simd;
#[cfg(test)]
mod test_data;
mod winograd;
