//! Tensor element types and their block-wise quantization (scalar reference).
//!
//! This module is the single source of truth for type ids, block size and the
//! byte layout of every tensor type; `format-spec/SPEC.md` documents the same
//! facts for other implementations.
//!
//! Layout of a quantized matrix `[rows, cols]` (cols a multiple of
//! [`TensorType::cols_multiple`]): planes, each row-major over the whole
//! matrix. First all quant bytes of all rows (`rows * cols * bits / 8`
//! bytes), then one f16 scale per block (q8, q4: `rows * cols / BLOCK`
//! values; q8r: one per row), or for q4k one `(d, dmin)` f16 pair per group of up to 256
//! weights of a row followed by 12 bytes of packed 6-bit sub-block scales per
//! group. Keeping quants
//! and scales apart lets a kernel stream a row's quants with aligned 32-byte
//! loads and convert eight or sixteen scales with one instruction; it is the
//! layout the kernels read straight from the mmap.

mod q4;
mod q4k;
mod q8;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use q4::{dequantize_q4_row, q4_max_scale, quantize_q4_row};
pub use q4k::{
    dequantize_q4k_row, q4k_pack_scales, q4k_unpack_scales, quantize_q4k_row,
    quantize_q4k_row_minmax, quantize_q4k_row_weighted, Q4K_GROUP, Q4K_SCALE_BYTES, Q4K_SUBS,
};
pub use q8::{dequantize_q8_row, dequantize_q8r_row, quantize_q8_row, quantize_q8r_row};

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
    /// 4-bit affine: `x = d * sc * q - dmin * m`, `q` in 0..=15, 6-bit `sc`
    /// and `m` per 32 weights, f16 `d` and `dmin` per 256 weights.
    Q4K,
    /// 8-bit with one scale per row: `x = d * q`, `q` in -127..=127, one f16
    /// `d` per row (rows a whole number of 32-blocks, so the q8 kernels run it).
    Q8R,
}

impl TensorType {
    pub const ALL: [TensorType; 6] = [
        Self::F32,
        Self::F16,
        Self::Q8,
        Self::Q4,
        Self::Q4K,
        Self::Q8R,
    ];

    /// The id written in the tensor directory.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8 => 2,
            Self::Q4 => 3,
            Self::Q4K => 4,
            Self::Q8R => 5,
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
            Self::Q4K => "q4k",
            Self::Q8R => "q8r",
        }
    }

    pub fn is_quantized(self) -> bool {
        matches!(self, Self::Q8 | Self::Q4 | Self::Q4K | Self::Q8R)
    }

    /// What the innermost dimension (`cols`) of a tensor of this type must be
    /// a multiple of: 1 for f32/f16, [`BLOCK`] for the quantized types (a q4k
    /// row whose length is not a multiple of [`Q4K_GROUP`] ends in a shorter
    /// group).
    pub fn cols_multiple(self) -> usize {
        match self {
            Self::F32 | Self::F16 => 1,
            Self::Q8 | Self::Q4 | Self::Q4K | Self::Q8R => BLOCK,
        }
    }

    /// Bytes per row of each plane of a `[rows, cols]` tensor, in file order
    /// (`cols` a multiple of [`Self::cols_multiple`]): values or quants;
    /// block scales (q8, q4), the row scale (q8r) or `(d, dmin)` pairs (q4k); packed sub-block
    /// scales (q4k). Unused planes are 0.
    pub fn row_planes(self, cols: usize) -> [usize; 3] {
        self.planes(cols as u64)
            .expect("row_planes: row size overflows")
            .map(|n| usize::try_from(n).expect("row_planes: row size overflows"))
    }

    /// [`Self::row_planes`] in u64, or `None` if a plane's size overflows:
    /// the one statement of each type's row layout.
    fn planes(self, cols: u64) -> Option<[u64; 3]> {
        let blocks = cols / BLOCK as u64;
        Some(match self {
            Self::F32 => [cols.checked_mul(4)?, 0, 0],
            Self::F16 => [cols.checked_mul(2)?, 0, 0],
            Self::Q8 => [cols, blocks * 2, 0],
            Self::Q4 => [cols / 2, blocks * 2, 0],
            Self::Q8R => [cols, 2, 0],
            Self::Q4K => {
                let groups = cols.div_ceil(Q4K_GROUP as u64);
                [cols / 2, groups * 4, groups * Q4K_SCALE_BYTES as u64]
            }
        })
    }

    /// Bytes one row of `cols` elements occupies (the sum of
    /// [`Self::row_planes`]), or `None` if `cols` is not a multiple of
    /// [`Self::cols_multiple`] or the size overflows.
    fn row_bytes(self, cols: u64) -> Option<u64> {
        if !cols.is_multiple_of(self.cols_multiple() as u64) {
            return None;
        }
        let [a, b, c] = self.planes(cols)?;
        a.checked_add(b)?.checked_add(c)
    }

    /// Bytes a `[rows, cols]` tensor occupies (`rows`: the product of all
    /// outer dimensions), or `None` if `cols` is not a whole number of blocks
    /// for a quantized type or the size overflows.
    pub fn byte_len(self, rows: u64, cols: u64) -> Option<u64> {
        self.row_bytes(cols)?.checked_mul(rows)
    }

    /// Bits per weight including scales, for rows of 256 weights (a q4k row
    /// ending in a shorter group spends more on that group's scales; a q8r row
    /// spends 16 bits on its scale whatever its length).
    pub fn bits_per_weight(self) -> f64 {
        let cols = Q4K_GROUP as u64;
        let bytes = self.row_bytes(cols).expect("a multiple of every block");
        (bytes * 8) as f64 / cols as f64
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
    /// An importance weight (of column `column`) that is negative or not
    /// finite.
    BadImportance {
        column: usize,
        value: f32,
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
                    "weight {index} is {value}, too large for f16 (as a value or a block scale)"
                )
            }
            Self::BadLength { len } => {
                write!(f, "row length {len} is not a whole number of blocks")
            }
            Self::BadImportance { column, value } => {
                write!(
                    f,
                    "importance of column {column} is {value}; it must be finite and not negative"
                )
            }
        }
    }
}

impl std::error::Error for QuantError {}

impl QuantError {
    /// The same error with its weight index moved by `base` (a row's first
    /// index within its tensor).
    pub fn offset(self, base: usize) -> Self {
        match self {
            Self::NonFinite { index, value } => Self::NonFinite {
                index: index + base,
                value,
            },
            Self::TooLarge { index, value } => Self::TooLarge {
                index: index + base,
                value,
            },
            other => other,
        }
    }
}

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
    /// `qs`: rows * cols bytes; `d`: one scale per row.
    Q8R {
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
    /// `qs`: rows * cols / 2 bytes packed like q4; `dm`: `(d, dmin)` per group
    /// (256 weights of a row, or fewer in a row's last group); `sc`: 12 bytes
    /// of packed 6-bit `(sc, m)` per group (see [`q4k_unpack_scales`]).
    Q4K {
        qs: &'a [u8],
        dm: &'a [f16],
        sc: &'a [u8],
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
        if ty.byte_len(rows as u64, cols as u64)? != bytes.len() as u64 {
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
            TensorType::Q8R => {
                let (qs, d) = bytes.split_at(n);
                Self::Q8R {
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
            TensorType::Q4K => {
                let (qs, rest) = bytes.split_at(n / 2);
                let (dm, sc) = rest.split_at(rows * ty.row_planes(cols)[1]);
                Self::Q4K {
                    qs,
                    dm: bytemuck::try_cast_slice(dm).ok()?,
                    sc,
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
            | Self::Q4 { rows, .. }
            | Self::Q4K { rows, .. }
            | Self::Q8R { rows, .. } => rows,
        }
    }

    pub fn cols(&self) -> usize {
        match *self {
            Self::F32 { cols, .. }
            | Self::F16 { cols, .. }
            | Self::Q8 { cols, .. }
            | Self::Q4 { cols, .. }
            | Self::Q4K { cols, .. }
            | Self::Q8R { cols, .. } => cols,
        }
    }

    pub fn tensor_type(&self) -> TensorType {
        match self {
            Self::F32 { .. } => TensorType::F32,
            Self::F16 { .. } => TensorType::F16,
            Self::Q8 { .. } => TensorType::Q8,
            Self::Q4 { .. } => TensorType::Q4,
            Self::Q4K { .. } => TensorType::Q4K,
            Self::Q8R { .. } => TensorType::Q8R,
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
            Self::Q8R { qs, d, .. } => dequantize_q8r_row(&qs[r * cols..(r + 1) * cols], d[r], out),
            Self::Q4 { qs, d, .. } => dequantize_q4_row(
                &qs[r * cols / 2..(r + 1) * cols / 2],
                &d[r * nb..(r + 1) * nb],
                out,
            ),
            Self::Q4K { qs, dm, sc, .. } => {
                let [_, dm_row, sc_row] = TensorType::Q4K.row_planes(cols);
                dequantize_q4k_row(
                    &qs[r * cols / 2..(r + 1) * cols / 2],
                    &dm[r * dm_row / 2..(r + 1) * dm_row / 2],
                    &sc[r * sc_row..(r + 1) * sc_row],
                    out,
                )
            }
        }
    }
}

/// Quantizes a whole `[rows, cols]` f32 matrix into the on-disk byte layout of
/// `ty` (for F32/F16 a plain conversion). Deterministic: the same input always
/// gives the same bytes. NaN and infinite inputs are refused for every type, as
/// are finite values the type cannot hold (beyond f16 range for F16, or a
/// block scale beyond it for the quantized types): a model with such weights
/// is corrupt.
pub fn encode_matrix(ty: TensorType, cols: usize, src: &[f32]) -> Result<Vec<u8>, QuantError> {
    encode_matrix_weighted(ty, cols, src, None)
}

/// [`encode_matrix`] with one importance per column for every row (see
/// [`encode_row_weighted`]); `None` is [`encode_matrix`].
pub fn encode_matrix_weighted(
    ty: TensorType,
    cols: usize,
    src: &[f32],
    importance: Option<&[f32]>,
) -> Result<Vec<u8>, QuantError> {
    if cols == 0
        || !cols.is_multiple_of(ty.cols_multiple())
        || !src.len().is_multiple_of(cols)
        || importance.is_some_and(|w| w.len() != cols)
    {
        return Err(QuantError::BadLength { len: cols });
    }
    let rows = src.len() / cols;
    let mut out = vec![0u8; ty.row_planes(cols).iter().sum::<usize>() * rows];
    let planes = tensor_planes(ty, cols, rows, &mut out);
    for (r, (row, planes)) in src
        .chunks_exact(cols)
        .zip(split_rows(ty, cols, planes))
        .enumerate()
    {
        encode_row_weighted(ty, row, importance, planes).map_err(|e| e.offset(r * cols))?;
    }
    Ok(out)
}

/// The three planes of a `[rows, cols]` tensor's bytes (see
/// [`TensorType::row_planes`]; unused planes are empty).
///
/// # Panics
/// If `bytes` is not exactly the tensor's length.
pub fn tensor_planes(ty: TensorType, cols: usize, rows: usize, bytes: &mut [u8]) -> [&mut [u8]; 3] {
    let lens = ty.row_planes(cols);
    assert_eq!(
        bytes.len(),
        lens.iter().sum::<usize>() * rows,
        "tensor_planes: length"
    );
    let (p0, rest) = bytes.split_at_mut(lens[0] * rows);
    let (p1, p2) = rest.split_at_mut(lens[1] * rows);
    [p0, p1, p2]
}

/// Splits planes holding the same rows of a `[_, cols]` tensor of type `ty`
/// (a whole tensor's [`tensor_planes`], or the same run of rows of each) into
/// each row's share of each plane, as [`encode_row`] takes them.
pub fn split_rows(ty: TensorType, cols: usize, planes: [&mut [u8]; 3]) -> Vec<[&mut [u8]; 3]> {
    let lens = ty.row_planes(cols);
    let rows = planes[0].len() / lens[0];
    let mut planes = planes;
    (0..rows)
        .map(|_| {
            std::array::from_fn(|i| {
                let (row, rest) = std::mem::take(&mut planes[i]).split_at_mut(lens[i]);
                planes[i] = rest;
                row
            })
        })
        .collect()
}

/// Takes the first `rows` rows off each of `planes` (planes holding the same
/// rows of a `[_, cols]` tensor of type `ty`), leaving the rest in `planes`:
/// how a converter walks a tensor's planes batch by batch.
pub fn take_rows<'a>(
    ty: TensorType,
    cols: usize,
    planes: &mut [&'a mut [u8]; 3],
    rows: usize,
) -> [&'a mut [u8]; 3] {
    let lens = ty.row_planes(cols);
    std::array::from_fn(|i| {
        let (head, rest) = std::mem::take(&mut planes[i]).split_at_mut(rows * lens[i]);
        planes[i] = rest;
        head
    })
}

/// Encodes one row of `ty` into its share of each plane (`planes[i]` of
/// length `ty.row_planes(x.len())[i]`, as raw little-endian bytes, no
/// alignment needed). The one row encoder behind [`encode_matrix`] and the
/// converters; same rules as [`encode_matrix`].
pub fn encode_row(ty: TensorType, x: &[f32], planes: [&mut [u8]; 3]) -> Result<(), QuantError> {
    encode_row_weighted(ty, x, None, planes)
}

/// [`encode_row`], with the error the quantizer minimizes weighted by each
/// column's `importance` where the type's encoder can use it (`q4k`); other
/// types ignore it.
pub fn encode_row_weighted(
    ty: TensorType,
    x: &[f32],
    importance: Option<&[f32]>,
    planes: [&mut [u8]; 3],
) -> Result<(), QuantError> {
    if !x.len().is_multiple_of(ty.cols_multiple())
        || planes
            .iter()
            .zip(ty.row_planes(x.len()))
            .any(|(p, len)| p.len() != len)
    {
        return Err(QuantError::BadLength { len: x.len() });
    }
    let [p0, p1, p2] = planes;
    // f16 scale planes are filled from an aligned copy
    let mut halves = vec![f16::ZERO; p1.len() / 2];
    match ty {
        TensorType::F32 => {
            check_finite(x)?;
            for (o, v) in p0.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        TensorType::F16 => {
            check_finite(x)?;
            for (index, (o, &v)) in p0.chunks_exact_mut(2).zip(x).enumerate() {
                let h = f16::from_f32(v);
                // A finite weight must not silently become infinite.
                if !h.is_finite() {
                    return Err(QuantError::TooLarge { index, value: v });
                }
                o.copy_from_slice(&h.to_bits().to_le_bytes());
            }
        }
        TensorType::Q8 => quantize_q8_row(x, bytemuck::cast_slice_mut(p0), &mut halves)?,
        TensorType::Q8R => halves[0] = quantize_q8r_row(x, bytemuck::cast_slice_mut(p0))?,
        TensorType::Q4 => quantize_q4_row(x, p0, &mut halves)?,
        TensorType::Q4K => match importance {
            Some(imp) => quantize_q4k_row_weighted(x, imp, p0, &mut halves, p2)?,
            None => quantize_q4k_row(x, p0, &mut halves, p2)?,
        },
    }
    for (o, h) in p1.chunks_exact_mut(2).zip(&halves) {
        o.copy_from_slice(&h.to_bits().to_le_bytes());
    }
    Ok(())
}

/// Checks a block for values that cannot be quantized.
fn check_finite(xs: &[f32]) -> Result<(), QuantError> {
    // A branch-free maximum of the magnitude bits vectorizes (an early-exit
    // search does not, and cost a sixth of q4 encoding); the position is
    // looked up only for the error.
    let largest_bits = xs.iter().map(|x| x.to_bits() & 0x7fff_ffff).max();
    if largest_bits.is_none_or(|b| b < f32::INFINITY.to_bits()) {
        return Ok(());
    }
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
    // portable and inlinable; rounds like `from_f32` (see `q4::choose_scale`)
    let h = f16::from_f32_const(d);
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
        assert_eq!(TensorType::Q4.byte_len(1, 64), Some(32 + 4));
        assert_eq!(TensorType::Q8.byte_len(2, 32), Some(64 + 4));
        assert_eq!(TensorType::Q8.byte_len(1, 33), None);
        assert_eq!(TensorType::F16.byte_len(3, 1), Some(6));
        assert_eq!(TensorType::F32.byte_len(1, u64::MAX), None);
        assert_eq!(TensorType::F32.byte_len(u64::MAX, 1), None);
        assert_eq!(TensorType::Q4K.byte_len(2, 256), Some(256 + 2 * (4 + 12)));
        // 576 = 2 * 256 + 64: a third, shorter group with its own scales
        assert_eq!(TensorType::Q4K.byte_len(1, 576), Some(288 + 3 * (4 + 12)));
        assert_eq!(TensorType::Q4K.byte_len(1, 48), None);
        assert_eq!(TensorType::Q4K.bits_per_weight(), 4.5);
        assert_eq!(TensorType::Q4.bits_per_weight(), 4.5);
        assert_eq!(TensorType::Q8.bits_per_weight(), 8.5);
        assert_eq!(TensorType::Q8R.byte_len(3, 64), Some(3 * (64 + 2)));
        assert_eq!(TensorType::Q8R.byte_len(1, 48), None);
        assert_eq!(TensorType::Q8R.bits_per_weight(), 8.0625);
        for t in TensorType::ALL {
            for cols in [t.cols_multiple() * 3, 576, 1024] {
                let per_row: usize = t.row_planes(cols).iter().sum();
                assert_eq!(t.byte_len(2, cols as u64), Some(2 * per_row as u64), "{t}");
            }
        }
    }
}
