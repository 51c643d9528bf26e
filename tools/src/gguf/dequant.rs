//! ggml's block types decoded to f32, with the formulas of ggml's reference
//! `dequantize_row_*` (ggml-quants.c; layouts in ggml-common.h). Each
//! product and sum is a separate f32 operation in ggml's order (Rust never
//! fuses them), so results are bit-identical to ggml's scalar code and to the
//! `gguf` Python package's numpy decoder.

use super::GgmlType;
use half::f16;

fn half(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Decodes `src`, holding exactly `out.len()` weights of type `ty`, into `out`.
///
/// # Panics
/// If `out.len()` is not a whole number of blocks or `src` has the wrong
/// length; callers size both from a validated tensor directory.
pub fn dequantize(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    let bl = ty.block_len();
    assert!(
        out.len().is_multiple_of(bl) && src.len() == out.len() / bl * ty.block_bytes(),
        "dequantize: {} bytes of {ty} cannot hold {} weights",
        src.len(),
        out.len()
    );
    let blocks = src
        .chunks_exact(ty.block_bytes())
        .zip(out.chunks_exact_mut(bl));
    match ty {
        GgmlType::F32 => {
            for (b, y) in blocks {
                y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (b, y) in blocks {
                y[0] = half(b, 0);
            }
        }
        GgmlType::Bf16 => {
            for (b, y) in blocks {
                y[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| q4_0(b, y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| q4_1(b, y)),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| q8_0(b, y)),
        GgmlType::Q4K => blocks.for_each(|(b, y)| q4_k(b, y)),
        GgmlType::Q5K => blocks.for_each(|(b, y)| q5_k(b, y)),
        GgmlType::Q6K => blocks.for_each(|(b, y)| q6_k(b, y)),
    }
}

/// `{f16 d; u8 qs[16]}`: weight j is the low nibble of qs[j], weight j+16
/// the high nibble; x = d·(q − 8).
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0xF) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// `{f16 d; f16 m; u8 qs[16]}`: nibbles as Q4_0; x = d·q + m.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let m = half(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0xF) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// `{f16 d; i8 qs[32]}`: x = d·q.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    for (j, &q) in b[2..34].iter().enumerate() {
        y[j] = q as i8 as f32 * d;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block,
/// packed in 12 bytes: sub-blocks 0–3 in the low 6 bits of bytes 0–3
/// (scales) and 4–7 (mins); sub-blocks 4–7 split between the nibbles of bytes
/// 8–11 and the top 2 bits of bytes 0–7.
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `{f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}`: 8 sub-blocks of 32; each
/// 32 bytes of qs hold two sub-blocks (low nibbles, then high nibbles).
/// x = (d·sc)·q − (dmin·m).
fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let dmin = half(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..4 {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let y = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0xF) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// `{f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}`: as Q4_K with
/// a fifth bit per weight; bit `2·chunk` of qh[l] belongs to the low-nibble
/// sub-block of chunk `chunk`, bit `2·chunk+1` to the high-nibble one.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let dmin = half(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for chunk in 0..4 {
        let ql = &qs[chunk * 32..chunk * 32 + 32];
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
        let y = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            let hi1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let hi2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((ql[l] & 0xF) + hi1) as f32 - m1;
            y[l + 32] = d2 * ((ql[l] >> 4) + hi2) as f32 - m2;
        }
    }
}

/// `{u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}`: 16 sub-blocks of 16
/// with 8-bit scales; 6-bit weights (4 low bits in ql, 2 high bits in qh),
/// offset by 32. Each half of the block (128 weights) uses 64 bytes of ql
/// and 32 of qh; x = (d·sc)·(q − 32).
fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = half(b, 208);
    for half_block in 0..2 {
        let ql = &b[half_block * 64..half_block * 64 + 64];
        let qh = &b[128 + half_block * 32..128 + half_block * 32 + 32];
        let sc = &b[192 + half_block * 8..192 + half_block * 8 + 8];
        let y = &mut y[half_block * 128..half_block * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * (sc[is + k] as i8) as f32;
            y[l] = s(0) * q1 as f32;
            y[l + 32] = s(2) * q2 as f32;
            y[l + 64] = s(4) * q3 as f32;
            y[l + 96] = s(6) * q4 as f32;
        }
    }
}
