//! kiln's CPU kernels: what the engine's f32 layers spend their time in on a CPU.
//!
//! # Layout
//! - [`gemm`]: f32 matrix products on strided views, by OpenBLAS when the machine has
//!   `libopenblas.so.0` (loaded at run time) and by the gemm crate otherwise.
//! - `attention`: softmax attention a tile of queries against a tile of keys at a time, with
//!   the running maximum and sum of the online softmax, so memory stays linear in the tokens.
//! - [`ops`]: both as candle ops ([`ops::linear`], [`ops::attention`]).
//!
//! Everything here is exercised by the engine's parity tests as well as its own.

mod attention;
pub mod gemm;
pub mod ops;
#[cfg(test)]
mod test_data;
