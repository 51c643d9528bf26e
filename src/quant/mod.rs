//! Tensor element types and their block-wise quantization (scalar reference).
//!
//! This module is the single source of truth for type ids, block size and the
//! byte layout of every tensor type; `format-spec/SPEC.md` documents the same
//! facts for other implementations.
//!
//! Layout of a quantized matrix `[rows, cols]` (cols a multiple of [`BLOCK`]):
//! all quant bytes of all rows first (row-major, `rows * cols * bits / 8`
//! bytes), then one f16 scale per block (row-major, `rows * cols / BLOCK`
//! values). Keeping quants and scales apart lets a kernel stream a row's quants
//! with aligned 32-byte loads and convert eight or sixteen scales with one
//! instruction; it is the layout the kernels read straight from the mmap.

mod q4;
mod q8;

pub use q4::{dequantize_q4_row, q4_max_scale, quantize_q4_row, Q4_CANDIDATE_DIVISORS};
pub use q8::{dequantize_q8_row, quantize_q8_row};

use half::f16;
use std::fmt;

/// Weights per quantization block, for every block type.
pub const BLOCK: usize = 32;

/// Element type of a tensor, with its on-disk id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TensorType {
    F32,
    F16,
    /// 8-bit: `x = d * q`, `q` in -127..=127, one f16 `d` per 32 weights.
    Q8,
    /// 4-bit linear: `x = d * (q - 8)`, `q` in 0..=15, one f16 `d` per 32 weights.
    Q4,
}

impl TensorType {
    pub const ALL: [TensorType; 4] = [Self::F32, Self::F16, Self::Q8, Self::Q4];

    /// The id written in the tensor directory.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8 => 2,
            Self::Q4 => 3,
        }
    }

    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8 => "q8",
            Self::Q4 => "q4",
        }
    }

    pub fn is_quantized(self) -> bool {
        matches!(self, Self::Q8 | Self::Q4)
    }

    /// Bits of quant data per weight, scales not counted.
    fn quant_bits(self) -> usize {
        match self {
            Self::F32 => 32,
            Self::F16 => 16,
            Self::Q8 => 8,
            Self::Q4 => 4,
        }
    }

    /// Bytes a tensor of `n` elements occupies, or `None` if `n` is not a whole
    /// number of blocks for a quantized type (or overflows).
    pub fn byte_len(self, n: u64) -> Option<u64> {
        if self.is_quantized() {
            if !n.is_multiple_of(BLOCK as u64) {
                return None;
            }
            let quants = n.checked_mul(self.quant_bits() as u64)? / 8;
            quants.checked_add((n / BLOCK as u64).checked_mul(2)?)
        } else {
            n.checked_mul(self.quant_bits() as u64 / 8)
        }
    }

    /// Bits per weight including scales.
    pub fn bits_per_weight(self) -> f64 {
        if self.is_quantized() {
            self.quant_bits() as f64 + 16.0 / BLOCK as f64
        } else {
            self.quant_bits() as f64
        }
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a block could not be quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum QuantError {
    NonFinite {
        index: usize,
        value: f32,
    },
    /// A finite value so large that its block scale overflows f16.
    TooLarge {
        index: usize,
        value: f32,
    },
    BadLength {
        len: usize,
    },
}

impl fmt::Display for QuantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NonFinite { index, value } => {
                write!(f, "weight {index} is {value}, which cannot be quantized")
            }
            Self::TooLarge { index, value } => {
                write!(
                    f,
                    "weight {index} is {value}, too large for an f16 block scale"
                )
            }
            Self::BadLength { len } => {
                write!(f, "row length {len} is not a multiple of {BLOCK}")
            }
        }
    }
}

impl std::error::Error for QuantError {}

/// A read-only view of a weight matrix `[rows, cols]` in any tensor type,
/// borrowing the bytes in place (normally from the mmap).
#[derive(Clone, Copy, Debug)]
pub enum WeightView<'a> {
    F32 {
        data: &'a [f32],
        rows: usize,
        cols: usize,
    },
    F16 {
        data: &'a [f16],
        rows: usize,
        cols: usize,
    },
    /// `qs`: rows * cols bytes; `d`: rows * cols / BLOCK scales.
    Q8 {
        qs: &'a [i8],
        d: &'a [f16],
        rows: usize,
        cols: usize,
    },
    /// `qs`: rows * cols / 2 bytes, 16 per block: byte `j` holds weight `j` in
    /// its low nibble and weight `j + 16` in its high nibble.
    Q4 {
        qs: &'a [u8],
        d: &'a [f16],
        rows: usize,
        cols: usize,
    },
}

impl<'a> WeightView<'a> {
    /// Interprets `bytes` (the tensor's data, in the layout described at the
    /// top of this module) as a matrix. Returns `None` if the length, shape or
    /// alignment does not fit the type.
    pub fn from_bytes(ty: TensorType, rows: usize, cols: usize, bytes: &'a [u8]) -> Option<Self> {
        let n = rows.checked_mul(cols)?;
        if ty.byte_len(n as u64)? != bytes.len() as u64 {
            return None;
        }
        Some(match ty {
            TensorType::F32 => Self::F32 {
                data: bytemuck::try_cast_slice(bytes).ok()?,
                rows,
                cols,
            },
            TensorType::F16 => Self::F16 {
                data: bytemuck::try_cast_slice(bytes).ok()?,
                rows,
                cols,
            },
            TensorType::Q8 => {
                let (qs, d) = bytes.split_at(n);
                Self::Q8 {
                    qs: bytemuck::cast_slice(qs),
                    d: bytemuck::try_cast_slice(d).ok()?,
                    rows,
                    cols,
                }
            }
            TensorType::Q4 => {
                let (qs, d) = bytes.split_at(n / 2);
                Self::Q4 {
                    qs,
                    d: bytemuck::try_cast_slice(d).ok()?,
                    rows,
                    cols,
                }
            }
        })
    }

    pub fn rows(&self) -> usize {
        match *self {
            Self::F32 { rows, .. }
            | Self::F16 { rows, .. }
            | Self::Q8 { rows, .. }
            | Self::Q4 { rows, .. } => rows,
        }
    }

    pub fn cols(&self) -> usize {
        match *self {
            Self::F32 { cols, .. }
            | Self::F16 { cols, .. }
            | Self::Q8 { cols, .. }
            | Self::Q4 { cols, .. } => cols,
        }
    }

    pub fn tensor_type(&self) -> TensorType {
        match self {
            Self::F32 { .. } => TensorType::F32,
            Self::F16 { .. } => TensorType::F16,
            Self::Q8 { .. } => TensorType::Q8,
            Self::Q4 { .. } => TensorType::Q4,
        }
    }

    /// Decodes row `r` into `out` (length `cols`), e.g. for an embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let cols = self.cols();
        let nb = cols / BLOCK;
        match *self {
            Self::F32 { data, .. } => out.copy_from_slice(&data[r * cols..(r + 1) * cols]),
            Self::F16 { data, .. } => {
                for (o, v) in out.iter_mut().zip(&data[r * cols..(r + 1) * cols]) {
                    *o = v.to_f32();
                }
            }
            Self::Q8 { qs, d, .. } => {
                dequantize_q8_row(&qs[r * cols..(r + 1) * cols], &d[r * nb..(r + 1) * nb], out)
            }
            Self::Q4 { qs, d, .. } => dequantize_q4_row(
                &qs[r * cols / 2..(r + 1) * cols / 2],
                &d[r * nb..(r + 1) * nb],
                out,
            ),
        }
    }
}

/// Quantizes a whole `[rows, cols]` f32 matrix into the on-disk byte layout of
/// `ty` (for F32/F16 a plain conversion). Deterministic: the same input always
/// gives the same bytes. NaN and infinite inputs are refused for every type, as
/// are finite values the type cannot hold (beyond f16 range for F16, or a
/// block scale beyond it for Q8/Q4): a model with such weights is corrupt.
pub fn encode_matrix(ty: TensorType, cols: usize, src: &[f32]) -> Result<Vec<u8>, QuantError> {
    match ty {
        TensorType::F32 => {
            check_finite(src)?;
            Ok(bytemuck::cast_slice(src).to_vec())
        }
        TensorType::F16 => {
            check_finite(src)?;
            let mut v = Vec::with_capacity(src.len());
            for (index, &x) in src.iter().enumerate() {
                let h = f16::from_f32(x);
                // A finite weight must not silently become infinite.
                if !h.is_finite() {
                    return Err(QuantError::TooLarge { index, value: x });
                }
                v.push(h);
            }
            Ok(bytemuck::cast_slice(&v).to_vec())
        }
        TensorType::Q8 | TensorType::Q4 => {
            if cols == 0 || !cols.is_multiple_of(BLOCK) || !src.len().is_multiple_of(cols) {
                return Err(QuantError::BadLength { len: cols });
            }
            let n = src.len();
            let qbytes = if ty == TensorType::Q8 { n } else { n / 2 };
            let mut qs = vec![0u8; qbytes];
            let mut d = vec![f16::ZERO; n / BLOCK];
            let row_q = qbytes / (n / cols);
            let row_d = cols / BLOCK;
            for (r, row) in src.chunks_exact(cols).enumerate() {
                let q = &mut qs[r * row_q..(r + 1) * row_q];
                let s = &mut d[r * row_d..(r + 1) * row_d];
                let res = if ty == TensorType::Q8 {
                    quantize_q8_row(row, bytemuck::cast_slice_mut(q), s)
                } else {
                    quantize_q4_row(row, q, s)
                };
                res.map_err(|e| match e {
                    QuantError::NonFinite { index, value } => QuantError::NonFinite {
                        index: index + r * cols,
                        value,
                    },
                    QuantError::TooLarge { index, value } => QuantError::TooLarge {
                        index: index + r * cols,
                        value,
                    },
                    other => other,
                })?;
            }
            let mut out = qs;
            out.extend_from_slice(bytemuck::cast_slice(&d));
            Ok(out)
        }
    }
}

/// Checks a block for values that cannot be quantized.
fn check_finite(xs: &[f32]) -> Result<(), QuantError> {
    match xs.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(QuantError::NonFinite {
            index,
            value: xs[index],
        }),
        None => Ok(()),
    }
}

/// Rounds a block scale to f16 (round-to-nearest-even), refusing scales f16
/// cannot hold. A scale that rounds to zero of either sign is stored as +0, so
/// a zero block has one encoding (q4's `m / -8` would otherwise give -0).
fn scale_to_f16(d: f32, block: &[f32]) -> Result<f16, QuantError> {
    let h = f16::from_f32(d);
    if h == f16::ZERO {
        Ok(f16::ZERO)
    } else if h.is_finite() {
        Ok(h)
    } else {
        let index = block
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .map(|(i, _)| i)
            .unwrap_or(0);
        Err(QuantError::TooLarge {
            index,
            value: block[index],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_ids_round_trip() {
        for t in TensorType::ALL {
            assert_eq!(TensorType::from_id(t.id()), Some(t));
        }
        assert_eq!(TensorType::from_id(99), None);
    }

    #[test]
    fn byte_lengths() {
        assert_eq!(TensorType::Q4.byte_len(64), Some(32 + 4));
        assert_eq!(TensorType::Q8.byte_len(64), Some(64 + 4));
        assert_eq!(TensorType::Q8.byte_len(33), None);
        assert_eq!(TensorType::F16.byte_len(3), Some(6));
        assert_eq!(TensorType::F32.byte_len(u64::MAX), None);
    }
}
