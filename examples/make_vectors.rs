//! Writes the `.nbl` test vectors of `format-spec/vectors/`: tiny files and,
//! beside each, a `.txt` with its header, metadata, tensor table, tensor bytes
//! and expected decoded values.
//!
//! ```text
//! cargo run --example make_vectors [-- OUT_DIR]     (default format-spec/vectors)
//! ```
//!
//! Everything here is deterministic: `tests/spec_vectors.rs` regenerates the
//! vectors and requires byte-identical output. The `.txt` is produced by a
//! small parser of the raw bytes written here from the spec, independent of
//! `nibble::format::NblFile`, so that test also checks the two agree.
//!
//! The raw-byte helpers (`fix_crcs`, `raw_directory`, ...) are also used by
//! `tests/reader_hostile.rs` to build corrupted files.

use nibble::format::{keys, Metadata, NblWriter, Value, HEADER_LEN};
use nibble::quant::{encode_matrix, encode_matrix_weighted, TensorType};
use std::fmt::Write as _;
use std::path::Path;

/// One tensor of a vector: the f32 values fed to the encoder.
pub struct Tensor {
    pub name: &'static str,
    pub ty: TensorType,
    pub shape: Vec<u64>,
    pub source: Vec<f32>,
    /// One importance per column, weighting the encoder's error (q4k's
    /// importance-weighted variant, SPEC section 6); `None`: unweighted.
    pub importance: Option<Vec<f32>>,
}

pub struct Vector {
    pub file: &'static str,
    pub about: &'static str,
    pub metadata: Metadata,
    pub tensors: Vec<Tensor>,
}

fn tensor(name: &'static str, ty: TensorType, shape: &[u64], source: Vec<f32>) -> Tensor {
    assert_eq!(shape.iter().product::<u64>() as usize, source.len());
    Tensor {
        name,
        ty,
        shape: shape.to_vec(),
        source,
        importance: None,
    }
}

/// Two q4k rows of one group, off any grid (a fixed pseudo-random walk), and
/// importances spanning five decades with two zero columns, so the weighted
/// encoding differs from the unweighted one (`tests/spec_vectors.rs`).
fn q4k_weighted() -> Tensor {
    let mut state = 0x2545_f491u32;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state as f32 / u32::MAX as f32
    };
    let source: Vec<f32> = (0..512).map(|_| next() * 2.0 - 0.7).collect();
    let importance: Vec<f32> = (0..256)
        .map(|j| match j {
            5 | 200 => 0.0,
            _ => 10f32.powi(j * 7 % 5 - 2) * (1.0 + next()),
        })
        .collect();
    Tensor {
        importance: Some(importance),
        ..tensor("q4k.weighted", TensorType::Q4K, &[2, 256], source)
    }
}

fn note(text: &str) -> Metadata {
    let mut m = Metadata::new();
    m.set("vector.about", Value::Str(text.into()));
    m
}

/// Eight blocks of 32 covering the cases a block quantizer can get wrong.
/// `ty` picks a grid-aligned block and a tie block that suit its formula.
fn edge_blocks(ty: TensorType) -> Vec<f32> {
    let mut v = Vec::with_capacity(8 * 32);
    // 0: all zeros.
    v.extend([0.0f32; 32]);
    // 1: a constant block.
    v.extend([0.5f32; 32]);
    // 2: mixed magnitudes, 1e-4 to 1e3, alternating signs.
    v.extend((0..32).map(|j| {
        let sign = if j % 2 == 0 { 1.0 } else { -1.0 };
        sign * 10f32.powi(j % 8 - 4) * (1.0 + j as f32 / 32.0)
    }));
    match ty {
        TensorType::Q8 => {
            // 3: already on the grid of d = 0.25 (an f16), with the extreme
            // levels +-127: decodes exactly.
            v.extend((0..32).map(|j| 0.25 * [127, -127, 0, 1, -1, 64, -3, 100][j % 8] as f32));
            // 4: halfway between levels of d = 0.125 (amax 127 * 0.125):
            // each rounds away from zero.
            v.push(15.875);
            v.extend((1..32).map(|j| {
                let sign = if j % 2 == 0 { 1.0 } else { -1.0 };
                sign * 0.125 * (j as f32 + 0.5)
            }));
        }
        _ => {
            // 3: already on the grid of d = -0.5 (m = 4 first), levels 0..=15.
            v.push(4.0);
            v.extend((1..32).map(|j| -0.5 * ((j % 16) as f32 - 8.0)));
            // 4: halfway between levels of d = -0.5, plus the largest
            // magnitude on both sides: the first one (-4) decides the sign
            // of the scale, so +4 is on the grid's shorter (7-step) side.
            v.push(-4.0);
            v.push(4.0);
            v.extend((2..32).map(|j| {
                let sign = if j % 2 == 0 { 1.0 } else { -1.0 };
                sign * 0.5 * ((j % 7) as f32 + 0.5)
            }));
        }
    }
    // 5: tiny values: the scale is an f16 subnormal, and 1e-30 flushes to 0.
    v.extend((0..32).map(|j| match j % 4 {
        0 => 1e-5,
        1 => -3e-6,
        2 => 1e-30,
        _ => 7.7e-7 * j as f32,
    }));
    // 6: large values whose scale is near the top of f16's range.
    let big = if ty == TensorType::Q8 { 8.0e6 } else { 5.2e5 };
    v.extend((0..32).map(|j| big * ((j as f32 - 15.5) / 15.5)));
    // 7: one negative spike among small values.
    v.extend((0..32).map(|j| if j == 9 { -100.0 } else { 0.01 * j as f32 }));
    v
}

/// Two q4k rows of one group each. Row 0: [`edge_blocks`] as its 8
/// sub-blocks (zero, constant, mixed magnitudes, on q4's grid, ties, tiny,
/// huge, spike; the huge one sets `d` and `dmin`, so the others get small or
/// zero 6-bit scales). Row 1: a group on q4k's own grid (`d = 2^-6`,
/// `dmin = 2^-5`, every sub-block with levels 0 and 15; decodes exactly), its
/// sub-blocks all positive, all negative, mixed, constant negative.
fn q4k_rows() -> Vec<f32> {
    let mut v = edge_blocks(TensorType::Q4);
    let (d, dmin) = (2f32.powi(-6), 2f32.powi(-5));
    let sc = [63u32, 1, 17, 40, 0, 63, 5, 33];
    let m = [0u32, 63, 10, 0, 63, 31, 2, 63];
    v.extend((0..256).map(|i| {
        let (k, j) = (i / 32, i % 32);
        let q = match j {
            0 => 0,
            1 => 15,
            _ => (j * 7 + k) % 16,
        };
        d * (sc[k] * q as u32) as f32 - dmin * m[k] as f32
    }));
    v
}

/// Two q4k rows of 352 = 256 + 96 values: a whole group, then a short group
/// of 3 sub-blocks with its own `d`, `dmin` and scales (fields 3..8 zero).
/// Row 0 ramps through both signs; row 1 is positive, with the short
/// group's sub-blocks small, large and constant.
fn q4k_short_rows() -> Vec<f32> {
    let row0 = (0..352).map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0);
    let row1 = (0..352).map(|i| match i {
        0..=255 => (i % 29) as f32 * 0.125,
        256..=287 => (i % 5) as f32 * 0.01,
        288..=319 => (i % 7) as f32 * 3.0,
        _ => 0.75,
    });
    row0.chain(row1).collect()
}

fn f16_values() -> Vec<f32> {
    vec![
        0.0,
        -0.0,
        1.0,
        -2.5,
        0.1,                // rounds
        65504.0,            // f16 max
        65519.0,            // rounds down to f16 max
        5.960_464_5e-8,     // 2^-24, smallest subnormal
        2e-8,               // rounds to 0
        3e-8,               // rounds up to 2^-24
        1.0 + 1.0 / 2048.0, // tie: to even (1)
        1.0 + 3.0 / 2048.0, // tie: to even (1 + 2^-9)
        1e4,
        -1e-3,
        std::f32::consts::PI,
        2049.0, // tie between 2048 and 2050: to even (2048)
        -65504.0,
        6.1e-5, // just below the smallest normal, 2^-14
        1e-30,
        -1e-30,
        0.333_333_34,
        -7.0,
        1234.5,
        0.000_123_4,
        100.0,
        -100.0,
        0.5,
        0.25,
        0.75,
        -0.125,
        42.0,
        -42.0,
    ]
}

/// Three q8r rows of 64: all zeros; on the grid of d = 0.25 with the extreme
/// levels (decodes exactly); halfway between levels of d = 0.125 (amax
/// 127 * 0.125), each rounding away from zero.
fn q8r_rows() -> Vec<f32> {
    let mut v = vec![0.0f32; 64];
    v.extend((0..64).map(|j| 0.25 * [127, -127, 0, 1, -1, 64, -3, 100][j % 8] as f32));
    v.push(15.875);
    v.extend((1..64).map(|j| {
        let sign = if j % 2 == 0 { 1.0 } else { -1.0 };
        sign * 0.125 * (j as f32 + 0.5)
    }));
    v
}

/// The vectors, in the order they are written.
pub fn vectors() -> Vec<Vector> {
    let f32_values = vec![
        0.0,
        -0.0,
        1.0,
        -1.5,
        0.1,
        1e-30,
        1e-45, // the smallest f32 subnormal
        f32::MAX,
        f32::MIN,
        f32::EPSILON,
        -123_456.79,
        std::f32::consts::E,
        0.333_333_34,
        1e30,
        -2.0,
        65504.0,
        7.0,
        -7.0,
    ];
    let mixed_source: Vec<f32> = (0..256)
        .map(|i| ((i * 37 % 29) as f32 - 14.0) / 8.0)
        .collect();
    vec![
        Vector {
            file: "f32",
            about: "f32 tensors of 1, 2 and 3 dimensions, edge values",
            metadata: note("f32 tensors of 1, 2 and 3 dimensions"),
            tensors: vec![
                tensor(
                    "f32.vector",
                    TensorType::F32,
                    &[5],
                    f32_values[..5].to_vec(),
                ),
                tensor(
                    "f32.matrix",
                    TensorType::F32,
                    &[2, 3],
                    f32_values[5..11].to_vec(),
                ),
                tensor(
                    "f32.cube",
                    TensorType::F32,
                    &[2, 2, 2],
                    f32_values[10..].to_vec(),
                ),
            ],
        },
        Vector {
            file: "f16",
            about: "one f16 matrix: rounding ties, subnormals, underflow, f16 max",
            metadata: note("f16 rounding"),
            tensors: vec![tensor(
                "f16.matrix",
                TensorType::F16,
                &[2, 16],
                f16_values(),
            )],
        },
        Vector {
            file: "q8",
            about: "one q8 matrix of 2 rows x 4 blocks: zero, constant, mixed magnitudes, \
                    on-grid, ties, tiny (subnormal scale), huge, spike",
            metadata: note("q8 edge blocks"),
            tensors: vec![tensor(
                "q8.matrix",
                TensorType::Q8,
                &[2, 128],
                edge_blocks(TensorType::Q8),
            )],
        },
        Vector {
            file: "q8r",
            about: "one q8r matrix of q8's edge blocks as 2 rows (one scale per row); \
                    one of 3 rows x 64: zero, on-grid (exact), ties",
            metadata: note("q8r rows"),
            tensors: vec![
                tensor(
                    "q8r.matrix",
                    TensorType::Q8R,
                    &[2, 128],
                    edge_blocks(TensorType::Q8),
                ),
                tensor("q8r.rows", TensorType::Q8R, &[3, 64], q8r_rows()),
            ],
        },
        Vector {
            file: "q4",
            about: "one q4 matrix of 2 rows x 4 blocks: zero, constant, mixed magnitudes, \
                    on-grid, ties and the largest-magnitude rule, tiny, huge, spike",
            metadata: note("q4 edge blocks"),
            tensors: vec![tensor(
                "q4.matrix",
                TensorType::Q4,
                &[2, 128],
                edge_blocks(TensorType::Q4),
            )],
        },
        Vector {
            file: "q4k",
            about: "one q4k matrix of 2 rows x 1 group: the q4 edge blocks as sub-blocks, \
                    and a group on the q4k grid (exact) with positive, negative, mixed and \
                    constant sub-blocks; one of 2 rows x 352 (a whole group, then a short \
                    group of 3 sub-blocks); one of 2 rows x 256 off the grid, encoded with \
                    per-column importances (the weighted variant)",
            metadata: note("q4k groups"),
            tensors: vec![
                tensor("q4k.matrix", TensorType::Q4K, &[2, 256], q4k_rows()),
                tensor("q4k.short", TensorType::Q4K, &[2, 352], q4k_short_rows()),
                q4k_weighted(),
            ],
        },
        Vector {
            file: "mixed",
            about: "metadata of every value type (the well-known keys of a tiny LLaMA) \
                    and one tensor of each type, with padding between tensors",
            metadata: mixed_metadata(),
            tensors: vec![
                tensor(
                    "model.norm.weight",
                    TensorType::F32,
                    &[7],
                    mixed_source[..7].to_vec(),
                ),
                tensor(
                    "t.f16",
                    TensorType::F16,
                    &[3, 3],
                    mixed_source[7..16].to_vec(),
                ),
                tensor(
                    "t.q8",
                    TensorType::Q8,
                    &[2, 32],
                    mixed_source[..64].to_vec(),
                ),
                tensor(
                    "t.q4",
                    TensorType::Q4,
                    &[1, 64],
                    mixed_source[..64].to_vec(),
                ),
                tensor("t.q4k", TensorType::Q4K, &[1, 256], mixed_source.clone()),
                tensor(
                    "t.q8r",
                    TensorType::Q8R,
                    &[2, 32],
                    mixed_source[64..128].to_vec(),
                ),
            ],
        },
    ]
}

fn mixed_metadata() -> Metadata {
    let mut m = Metadata::new();
    m.set(keys::ARCHITECTURE, Value::Str("llama".into()));
    m.set(keys::VOCAB_SIZE, Value::U32(4));
    m.set(keys::HIDDEN_SIZE, Value::U32(64));
    m.set(keys::NUM_LAYERS, Value::U32(1));
    m.set(keys::NUM_HEADS, Value::U32(4));
    m.set(keys::NUM_KV_HEADS, Value::U32(2));
    m.set(keys::HEAD_DIM, Value::U32(16));
    m.set(keys::INTERMEDIATE_SIZE, Value::U32(128));
    m.set(keys::ROPE_THETA, Value::F32(10000.0));
    m.set(keys::ROPE_SCALING_TYPE, Value::Str("linear".into()));
    m.set(keys::ROPE_SCALING_FACTOR, Value::F32(2.0));
    m.set(keys::RMS_NORM_EPS, Value::F32(1e-5));
    m.set(keys::CONTEXT_LENGTH, Value::U64(4096));
    m.set(keys::TIE_WORD_EMBEDDINGS, Value::Bool(true));
    m.set(keys::ADD_BOS_TOKEN, Value::Bool(false));
    m.set(keys::BOS_TOKEN_ID, Value::U32(1));
    m.set(keys::EOS_TOKEN_IDS, Value::U32Array(vec![2, 3]));
    m.set(keys::BOS_TOKEN, Value::Str("<s>".into()));
    m.set(keys::EOS_TOKEN, Value::Str("</s>".into()));
    m.set(
        keys::CHAT_TEMPLATE,
        Value::Str("{% for m in messages %}{{ m['content'] }}\n{% endfor %}".into()),
    );
    m.set(
        keys::TOKENIZER_JSON,
        Value::PackedStr(r#"{"model":{"type":"WordLevel","vocab":{"<unk>":0,"<s>":1,"</s>":2,"héllo":3},"unk_token":"<unk>"}}"#.into()),
    );
    m.set(
        keys::SOURCE_FILES,
        Value::StrArray(vec![
            "config.json".into(),
            "model.safetensors".into(),
            "".into(),
        ]),
    );
    m.set(keys::CONVERTER, Value::Str("make_vectors".into()));
    m.set(keys::QUANTIZATION, Value::Str("mixed".into()));
    m.set("vendor.unknown_key", Value::U64(u64::MAX));
    m
}

/// Writes every vector's `.nbl` and `.txt` into `dir`, plus `future.nbl`.
pub fn generate(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    for v in vectors() {
        let path = dir.join(format!("{}.nbl", v.file));
        let mut w = NblWriter::create(&path)?;
        for t in &v.tensors {
            let cols = *t.shape.last().unwrap() as usize;
            let bytes = encode_matrix_weighted(t.ty, cols, &t.source, t.importance.as_deref())?;
            w.add_tensor(t.name, t.ty, &t.shape, &bytes)?;
        }
        w.finish(&v.metadata)?;
        let bytes = std::fs::read(&path)?;
        let sources: Vec<Source> = v
            .tensors
            .iter()
            .map(|t| Source {
                name: t.name,
                values: &t.source,
                importance: t.importance.as_deref(),
            })
            .collect();
        std::fs::write(
            dir.join(format!("{}.txt", v.file)),
            describe(v.file, v.about, &bytes, &sources)?,
        )?;
    }
    let future = future_file(dir)?;
    std::fs::write(dir.join("future.nbl"), &future)?;
    std::fs::write(
        dir.join("future.txt"),
        describe(
            "future",
            "a file from a later minor version: version 1.9, an optional flag bit, a \
             metadata value of unknown type 200 (skipped) and a tensor of unknown type 100 \
             (the file opens; only that tensor is unusable)",
            &future,
            &[Source {
                name: "known",
                values: &[1.0, -2.0, 0.5],
                importance: None,
            }],
        )?,
    )?;
    Ok(())
}

/// A valid v1.1 file patched into what a later minor version could write.
fn future_file(dir: &Path) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let path = dir.join(".future-base.nbl");
    let mut w = NblWriter::create(&path)?;
    w.add_tensor(
        "known",
        TensorType::F32,
        &[3],
        &encode_matrix(TensorType::F32, 3, &[1.0, -2.0, 0.5])?,
    )?;
    // 32 bytes of a tensor type this version does not define.
    let opaque: Vec<u8> = (0..32u8).collect();
    w.add_tensor(
        "future.tensor",
        TensorType::Q8,
        &[32],
        &[&opaque[..], &[0, 0]].concat(),
    )?;
    let mut m = note("forward compatibility");
    m.set("future.value", Value::Str("\u{1}\u{2}\u{3}".into()));
    w.finish(&m)?;
    let mut b = std::fs::read(&path)?;
    std::fs::remove_file(&path)?;
    b[6..8].copy_from_slice(&9u16.to_le_bytes());
    b[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    for e in raw_metadata(&b)? {
        if e.key == "future.value" {
            b[e.type_pos] = 200;
        }
    }
    for e in raw_directory(&b)? {
        if e.name == "future.tensor" {
            b[e.type_pos..e.type_pos + 4].copy_from_slice(&100u32.to_le_bytes());
        }
    }
    fix_crcs(&mut b);
    Ok(b)
}

// ---------------------------------------------------------------------------
// Raw bytes, read straight from the spec (no use of nibble::format's reader).

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
pub fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
pub fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Header offsets of the fields patched by tests.
pub mod at {
    pub const VERSION_MAJOR: usize = 4;
    pub const VERSION_MINOR: usize = 6;
    pub const FLAGS: usize = 8;
    pub const TENSOR_COUNT: usize = 12;
    pub const DATA_OFFSET: usize = 16;
    pub const DATA_LEN: usize = 24;
    pub const METADATA_OFFSET: usize = 32;
    pub const METADATA_LEN: usize = 40;
    pub const DIRECTORY_OFFSET: usize = 48;
    pub const DIRECTORY_LEN: usize = 56;
    pub const METADATA_CRC: usize = 64;
    pub const DIRECTORY_CRC: usize = 68;
    pub const HEADER_CRC: usize = 72;
}

/// Byte range of a section named by the offsets of its (offset, len) fields.
pub fn section(b: &[u8], off_field: usize, len_field: usize) -> std::ops::Range<usize> {
    let off = u64_at(b, off_field) as usize;
    off..off + u64_at(b, len_field) as usize
}

/// Recomputes the metadata and directory checksums (where those sections
/// lie inside the file) and then the header checksum, so that a patched file
/// fails only the check a test aims at.
pub fn fix_crcs(b: &mut [u8]) {
    for (off, len, crc) in [
        (at::METADATA_OFFSET, at::METADATA_LEN, at::METADATA_CRC),
        (at::DIRECTORY_OFFSET, at::DIRECTORY_LEN, at::DIRECTORY_CRC),
    ] {
        let (o, l) = (u64_at(b, off), u64_at(b, len));
        if let Some(end) = o.checked_add(l).filter(|&e| e <= b.len() as u64) {
            let c = crc32fast::hash(&b[o as usize..end as usize]);
            b[crc..crc + 4].copy_from_slice(&c.to_le_bytes());
        }
    }
    let c = crc32fast::hash(&b[..at::HEADER_CRC]);
    b[at::HEADER_CRC..at::HEADER_CRC + 4].copy_from_slice(&c.to_le_bytes());
}

/// One metadata entry with the absolute positions of its fields.
pub struct RawMeta {
    pub key: String,
    pub type_id: u8,
    pub type_pos: usize,
    pub len_pos: usize,
    pub value: std::ops::Range<usize>,
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

pub fn raw_metadata(b: &[u8]) -> Res<Vec<RawMeta>> {
    let sec = section(b, at::METADATA_OFFSET, at::METADATA_LEN);
    let mut p = sec.start;
    let count = u32_at(b, p);
    p += 4;
    let mut out = Vec::new();
    for _ in 0..count {
        let klen = u16_at(b, p) as usize;
        let key = String::from_utf8(b[p + 2..p + 2 + klen].to_vec())?;
        p += 2 + klen;
        let type_pos = p;
        let len_pos = p + 1;
        let len = u64_at(b, len_pos) as usize;
        let value = len_pos + 8..len_pos + 8 + len;
        p = value.end;
        out.push(RawMeta {
            key,
            type_id: b[type_pos],
            type_pos,
            len_pos,
            value,
        });
    }
    if p != sec.end {
        return Err("metadata section has trailing bytes".into());
    }
    Ok(out)
}

/// One directory entry with the absolute positions of its fields.
pub struct RawEntry {
    pub name: String,
    pub type_id: u32,
    pub shape: Vec<u64>,
    pub offset: u64,
    pub len: u64,
    pub crc32: u32,
    pub start: usize,
    pub type_pos: usize,
    pub ndim_pos: usize,
    pub offset_pos: usize,
    pub len_pos: usize,
    pub crc_pos: usize,
}

pub fn raw_directory(b: &[u8]) -> Res<Vec<RawEntry>> {
    let sec = section(b, at::DIRECTORY_OFFSET, at::DIRECTORY_LEN);
    let mut p = sec.start;
    let mut out = Vec::new();
    for _ in 0..u32_at(b, at::TENSOR_COUNT) {
        let start = p;
        let nlen = u16_at(b, p) as usize;
        let name = String::from_utf8(b[p + 2..p + 2 + nlen].to_vec())?;
        p += 2 + nlen;
        let type_pos = p;
        let ndim_pos = p + 4;
        let ndim = b[ndim_pos] as usize;
        let shape = (0..ndim).map(|i| u64_at(b, ndim_pos + 1 + 8 * i)).collect();
        let offset_pos = ndim_pos + 1 + 8 * ndim;
        let (len_pos, crc_pos) = (offset_pos + 8, offset_pos + 16);
        p = crc_pos + 4;
        out.push(RawEntry {
            name,
            type_id: u32_at(b, type_pos),
            shape,
            offset: u64_at(b, offset_pos),
            len: u64_at(b, len_pos),
            crc32: u32_at(b, crc_pos),
            start,
            type_pos,
            ndim_pos,
            offset_pos,
            len_pos,
            crc_pos,
        });
    }
    if p != sec.end {
        return Err("directory section has trailing bytes".into());
    }
    Ok(out)
}

/// IEEE binary16 bits to f32, written out from the definition.
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f32;
    sign * match exp {
        0 => frac * 2f32.powi(-24),
        31 if frac == 0.0 => f32::INFINITY,
        31 => f32::NAN,
        _ => (1.0 + frac / 1024.0) * 2f32.powi(exp - 15),
    }
}

/// Decodes a tensor's bytes by the formulas of SPEC.md.
pub fn decode_raw(type_id: u32, shape: &[u64], data: &[u8]) -> Option<Vec<f32>> {
    let n = shape.iter().product::<u64>() as usize;
    let block = 32;
    match type_id {
        0 => Some(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        1 => Some(
            data.chunks_exact(2)
                .map(|c| f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        2 => {
            let (qs, ds) = data.split_at(n);
            Some(
                (0..n)
                    .map(|i| f16_bits_to_f32(u16_at(ds, 2 * (i / block))) * qs[i] as i8 as f32)
                    .collect(),
            )
        }
        3 => {
            let (qs, ds) = data.split_at(n / 2);
            Some(
                (0..n)
                    .map(|i| {
                        let (blk, j) = (i / block, i % block);
                        let byte = qs[blk * 16 + j % 16];
                        let q = if j < 16 { byte & 0x0f } else { byte >> 4 };
                        f16_bits_to_f32(u16_at(ds, 2 * blk)) * (q as i32 - 8) as f32
                    })
                    .collect(),
            )
        }
        4 => {
            // planes: n/2 quant bytes, (d, dmin) per group, 12 scale bytes
            // per group; ceil(cols / 256) groups per row
            let cols = *shape.last()? as usize;
            let gr = cols.div_ceil(256);
            let (qs, rest) = data.split_at(n / 2);
            let (dm, sc) = rest.split_at(n / cols * gr * 4);
            Some(
                (0..n)
                    .map(|i| {
                        let (r, c) = (i / cols, i % cols);
                        let (g, k, j) = (r * gr + c / 256, c % 256 / 32, c % 32);
                        let d = f16_bits_to_f32(u16_at(dm, 4 * g));
                        let dmin = f16_bits_to_f32(u16_at(dm, 4 * g + 2));
                        // fields 2p, 2p+1 are the 24-bit LE value at 12g + 3p
                        let p = 12 * g + 3 * (k / 2);
                        let v = sc[p] as u32 | (sc[p + 1] as u32) << 8 | (sc[p + 2] as u32) << 16;
                        let field = (v >> (12 * (k % 2))) & 0xfff;
                        let (s, m) = ((field & 63) as f32, (field >> 6) as f32);
                        let byte = qs[(i - j) / 2 + j % 16];
                        let q = if j < 16 { byte & 0x0f } else { byte >> 4 };
                        d * s * q as f32 - dmin * m
                    })
                    .collect(),
            )
        }
        5 => {
            // n quant bytes, then one f16 scale per row
            let cols = *shape.last()? as usize;
            let (qs, ds) = data.split_at(n);
            Some(
                (0..n)
                    .map(|i| f16_bits_to_f32(u16_at(ds, 2 * (i / cols))) * qs[i] as i8 as f32)
                    .collect(),
            )
        }
        _ => None,
    }
}

pub fn type_name(id: u32) -> String {
    match TensorType::from_id(id) {
        Some(t) => t.name().to_owned(),
        None => format!("type{id}"),
    }
}

/// An f32 as `<bits in hex> <shortest decimal that parses back to it>`.
pub fn f32_line(x: f32) -> String {
    format!("{:08x} {:?}", x.to_bits(), x)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A metadata value rendered for the `.txt` files.
pub fn render_raw_value(type_id: u8, v: &[u8]) -> String {
    let s = |b: &[u8]| serde_json::to_string(std::str::from_utf8(b).unwrap()).unwrap();
    match type_id {
        0 => format!("u32 {}", u32_at(v, 0)),
        1 => format!("u64 {}", u64_at(v, 0)),
        2 => format!(
            "f32 {}",
            f32_line(f32::from_le_bytes(v.try_into().unwrap()))
        ),
        3 => format!("bool {}", v[0] != 0),
        4 => format!("str {}", s(v)),
        5 => {
            let items: Vec<String> = v[8..]
                .chunks_exact(4)
                .map(|c| u32_at(c, 0).to_string())
                .collect();
            format!("u32[] [{}]", items.join(", "))
        }
        6 => {
            let mut items = Vec::new();
            let mut p = 8;
            for _ in 0..u64_at(v, 0) {
                let len = u64_at(v, p) as usize;
                items.push(s(&v[p + 8..p + 8 + len]));
                p += 8 + len;
            }
            format!("str[] [{}]", items.join(", "))
        }
        7 => {
            let mut text = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::ZlibDecoder::new(&v[8..]), &mut text)
                .unwrap();
            assert_eq!(text.len() as u64, u64_at(v, 0));
            format!("packed str {}", s(&text))
        }
        t => format!("type{t} (unknown, skipped) {}", hex(v)),
    }
}

/// The `.txt` companion of a vector, from its raw bytes.
/// What was fed to the encoder for one tensor.
pub struct Source<'a> {
    pub name: &'a str,
    pub values: &'a [f32],
    pub importance: Option<&'a [f32]>,
}

pub fn describe(file: &str, about: &str, b: &[u8], sources: &[Source]) -> Res<String> {
    let mut o = String::new();
    writeln!(o, "# {file}.nbl: {about}.")?;
    writeln!(
        o,
        "# Written by examples/make_vectors.rs; format-spec/SPEC.md explains each field."
    )?;
    writeln!(
        o,
        "# An f32 is written as its bits in hex, then the shortest decimal that"
    )?;
    writeln!(o, "# parses (round to nearest) to exactly that f32.")?;
    writeln!(o, "file_len {}", b.len())?;
    writeln!(o, "header.magic {}", hex(&b[0..4]))?;
    writeln!(o, "header.version {}.{}", u16_at(b, 4), u16_at(b, 6))?;
    writeln!(o, "header.flags 0x{:08x}", u32_at(b, at::FLAGS))?;
    writeln!(o, "header.tensor_count {}", u32_at(b, at::TENSOR_COUNT))?;
    for (name, field) in [
        ("data_offset", at::DATA_OFFSET),
        ("data_len", at::DATA_LEN),
        ("metadata_offset", at::METADATA_OFFSET),
        ("metadata_len", at::METADATA_LEN),
        ("directory_offset", at::DIRECTORY_OFFSET),
        ("directory_len", at::DIRECTORY_LEN),
    ] {
        writeln!(o, "header.{name} {}", u64_at(b, field))?;
    }
    for (name, field) in [
        ("metadata_crc32", at::METADATA_CRC),
        ("directory_crc32", at::DIRECTORY_CRC),
        ("header_crc32", at::HEADER_CRC),
    ] {
        writeln!(o, "header.{name} 0x{:08x}", u32_at(b, field))?;
    }
    assert_eq!(HEADER_LEN, 80);
    writeln!(o, "header.bytes {}", hex(&b[..HEADER_LEN]))?;
    let meta = raw_metadata(b)?;
    writeln!(o, "metadata.count {}", meta.len())?;
    for e in &meta {
        writeln!(
            o,
            "metadata {} {}",
            e.key,
            render_raw_value(e.type_id, &b[e.value.clone()])
        )?;
    }
    let dir = raw_directory(b)?;
    for e in &dir {
        writeln!(
            o,
            "tensor {} {} {:?} offset {} len {} crc32 0x{:08x}",
            e.name,
            type_name(e.type_id),
            e.shape,
            e.offset,
            e.len,
            e.crc32
        )?;
    }
    for e in &dir {
        let data = &b[e.offset as usize..(e.offset + e.len) as usize];
        writeln!(o, "\ndata {} ({} bytes, 32 per line)", e.name, data.len())?;
        for c in data.chunks(32) {
            writeln!(o, "{}", hex(c))?;
        }
        if let Some(src) = sources.iter().find(|s| s.name == e.name) {
            writeln!(
                o,
                "\nsource {} ({} values fed to the encoder)",
                e.name,
                src.values.len()
            )?;
            for &x in src.values {
                writeln!(o, "{}", f32_line(x))?;
            }
            if let Some(w) = src.importance {
                writeln!(
                    o,
                    "\nimportance {} ({} values, one per column, weighting the encoder's error)",
                    e.name,
                    w.len()
                )?;
                for &x in w {
                    writeln!(o, "{}", f32_line(x))?;
                }
            }
        }
        match decode_raw(e.type_id, &e.shape, data) {
            Some(values) => {
                writeln!(
                    o,
                    "\ndecoded {} ({} values, row-major)",
                    e.name,
                    values.len()
                )?;
                for x in values {
                    writeln!(o, "{}", f32_line(x))?;
                }
            }
            None => writeln!(o, "\nunusable {} (unknown type)", e.name)?,
        }
    }
    Ok(o)
}

/// The worked examples of SPEC.md: one block through each encoder.
pub fn spec_examples() -> String {
    let block: Vec<f32> = (0..32).map(|j| (j as f32 - 12.0) * 0.1).collect();
    let mut o = String::new();
    let vals: Vec<String> = block.iter().map(|x| format!("{x:?}")).collect();
    writeln!(o, "x[j] = (j - 12) * 0.1 in f32, j = 0..31:").unwrap();
    for c in vals.chunks(8) {
        writeln!(o, "  {}", c.join(" ")).unwrap();
    }
    for ty in TensorType::ALL
        .into_iter()
        .filter(|&t| t != TensorType::Q4K)
    {
        let bytes = encode_matrix(ty, 32, &block).unwrap();
        let decoded = decode_raw(ty.id(), &[32], &bytes).unwrap();
        writeln!(o, "\n{ty} ({} bytes):", bytes.len()).unwrap();
        for c in bytes.chunks(32) {
            writeln!(o, "  {}", hex(c)).unwrap();
        }
        if ty.is_quantized() {
            let d = u16_at(&bytes, bytes.len() - 2);
            writeln!(o, "  d = 0x{d:04x} = {:?}", f16_bits_to_f32(d)).unwrap();
            writeln!(
                o,
                "  decoded x[0], x[12], x[31] = {:?}, {:?}, {:?}",
                decoded[0], decoded[12], decoded[31]
            )
            .unwrap();
        }
    }
    o
}

/// The q4k worked example of SPEC.md: one group through the encoder.
pub fn spec_example_q4k() -> String {
    let x: Vec<f32> = (0..256)
        .map(|j| ((37 * j % 64) as f32 - 20.0) * (0.01 + 0.0025 * (j / 32) as f32))
        .collect();
    let bytes = encode_matrix(TensorType::Q4K, 256, &x).unwrap();
    let decoded = decode_raw(TensorType::Q4K.id(), &[256], &bytes).unwrap();
    let mut o = String::new();
    writeln!(
        o,
        "x[j] = (((37 j) mod 64) - 20) * (0.01 + 0.0025 * floor(j / 32)) in f32, j = 0..255"
    )
    .unwrap();
    writeln!(o, "  x[0..8] = {:?}", &x[..8]).unwrap();
    writeln!(o, "  x[224..232] = {:?}", &x[224..232]).unwrap();
    writeln!(o, "\nq4k ({} bytes):", bytes.len()).unwrap();
    writeln!(o, "  quants (128 bytes):").unwrap();
    for c in bytes[..128].chunks(32) {
        writeln!(o, "    {}", hex(c)).unwrap();
    }
    let (d, dmin) = (u16_at(&bytes, 128), u16_at(&bytes, 130));
    writeln!(o, "  d, dmin (4 bytes): {}", hex(&bytes[128..132])).unwrap();
    writeln!(
        o,
        "    d = 0x{d:04x} = {:?}, dmin = 0x{dmin:04x} = {:?}",
        f16_bits_to_f32(d),
        f16_bits_to_f32(dmin)
    )
    .unwrap();
    writeln!(o, "  scales (12 bytes): {}", hex(&bytes[132..144])).unwrap();
    let (sc, m) = nibble::quant::q4k_unpack_scales(&bytes[132..144]);
    writeln!(o, "    sc = {sc:?}").unwrap();
    writeln!(o, "    m  = {m:?}").unwrap();
    writeln!(
        o,
        "  decoded x[0], x[100], x[255] = {:?}, {:?}, {:?}",
        decoded[0], decoded[100], decoded[255]
    )
    .unwrap();
    o
}

#[allow(dead_code)]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map_or("format-spec/vectors", |a| a.as_str());
    generate(Path::new(dir))?;
    eprintln!("wrote vectors to {dir}");
    // The worked examples pasted into SPEC.md.
    if args.iter().any(|a| a == "--spec-examples") {
        print!("{}", spec_examples());
        println!("--- q4k");
        print!("{}", spec_example_q4k());
    }
    Ok(())
}
