//! Reading GGUF files (llama.cpp's model format, versions 2 and 3) and
//! importing LLaMA-architecture models from them.
//!
//! - this module: the container — header, typed metadata, tensor directory —
//!   parsed from a memory map with every count, length and offset checked
//!   against the file before it is used
//! - [`dequant`]: ggml's block types decoded to f32
//! - [`llama`]: `llama.*` metadata → [`LlamaConfig`](crate::hf::LlamaConfig),
//!   GGUF tensor names and layouts → HuggingFace ones, and the conversion
//! - [`tokenizer`]: `tokenizer.ggml.*` → a HuggingFace `tokenizer.json`
//!
//! The layout follows ggml's `docs/gguf.md`: little-endian; strings are a u64
//! byte length and UTF-8 bytes; tensor dimensions are listed innermost first;
//! tensor data starts at the next multiple of `general.alignment` (default
//! 32) after the tensor directory, and each tensor's offset is relative to it.

pub mod dequant;
pub mod llama;
pub mod tokenizer;

use crate::ToolError;
use memmap2::UncheckedAdvice;
use nibble::mapped_file_guard::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

pub const MAGIC: [u8; 4] = *b"GGUF";
/// Used when a file has no `general.alignment`.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// ggml tensors have at most four dimensions.
pub const MAX_DIMS: usize = 4;
/// Arrays may nest; real files nest at most once. The limit keeps a hostile
/// file from exhausting the stack.
const MAX_ARRAY_DEPTH: usize = 8;

/// The ggml tensor types nibble can import.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Bf16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

/// Every type id ggml has assigned, for error messages about the ones nibble
/// does not read (`ggml.h`'s `enum ggml_type`).
fn ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

impl GgmlType {
    pub const ALL: [GgmlType; 9] = [
        Self::F32,
        Self::F16,
        Self::Bf16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q8_0,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
    ];

    /// The id in ggml's `enum ggml_type`, as stored in a GGUF tensor info.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::Bf16 => 30,
        }
    }

    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    pub fn name(self) -> &'static str {
        ggml_type_name(self.id()).expect("every supported type has a name")
    }

    /// Weights per block.
    pub fn block_len(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::Bf16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => 32,
            Self::Q4K | Self::Q5K | Self::Q6K => 256,
        }
    }

    /// Bytes per block (`sizeof(block_*)` in ggml-common.h).
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Bytes of `n` weights, or `None` if `n` is not a whole number of blocks
    /// or the size overflows.
    pub fn byte_len(self, n: u64) -> Option<u64> {
        let bl = self.block_len() as u64;
        if !n.is_multiple_of(bl) {
            return None;
        }
        (n / bl).checked_mul(self.block_bytes() as u64)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A metadata value. Arrays keep their element type so an empty array still
/// says what it would hold.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(MetaArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// An array value, validated at open but parsed into [`MetaValue`]s only
/// when first read ([`MetaArray::items`]): an unread array costs nothing
/// beyond its bytes in the file map (a parsed element takes some 32 bytes,
/// so a 20M-element byte array would be 640 MB of memory).
#[derive(Clone)]
pub struct MetaArray {
    /// The GGUF value type id of the elements.
    pub elem_type: u32,
    len: u64,
    map: Arc<Mmap>,
    /// Offset of the first element in the map.
    start: usize,
    /// Arrays enclosing this one.
    depth: usize,
    items: OnceLock<Vec<MetaValue>>,
}

impl MetaArray {
    /// Number of elements.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The elements, parsed on first call.
    pub fn items(&self) -> &[MetaValue] {
        self.items.get_or_init(|| {
            let mut c = Cursor {
                bytes: &self.map,
                pos: self.start,
                map: &self.map,
            };
            (0..self.len)
                .map(|_| {
                    c.value(self.elem_type, &"an array element", self.depth + 1)
                        .expect("validated when the file was opened")
                })
                .collect()
        })
    }
}

impl fmt::Debug for MetaArray {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "MetaArray {{ elem_type: {}, len: {} }}",
            self.elem_type, self.len
        )
    }
}

impl PartialEq for MetaArray {
    fn eq(&self, other: &Self) -> bool {
        self.elem_type == other.elem_type && self.len == other.len && self.items() == other.items()
    }
}

/// GGUF value type ids (`enum gguf_type`).
mod vt {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

fn value_type_name(t: u32) -> &'static str {
    match t {
        vt::U8 => "u8",
        vt::I8 => "i8",
        vt::U16 => "u16",
        vt::I16 => "i16",
        vt::U32 => "u32",
        vt::I32 => "i32",
        vt::F32 => "f32",
        vt::BOOL => "bool",
        vt::STRING => "string",
        vt::ARRAY => "array",
        vt::U64 => "u64",
        vt::I64 => "i64",
        vt::F64 => "f64",
        _ => "unknown",
    }
}

impl MetaValue {
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "u8",
            Self::I8(_) => "i8",
            Self::U16(_) => "u16",
            Self::I16(_) => "i16",
            Self::U32(_) => "u32",
            Self::I32(_) => "i32",
            Self::F32(_) => "f32",
            Self::Bool(_) => "bool",
            Self::Str(_) => "string",
            Self::Array(_) => "array",
            Self::U64(_) => "u64",
            Self::I64(_) => "i64",
            Self::F64(_) => "f64",
        }
    }

    /// Any integer type, if it is non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(x) => Some(x as u64),
            Self::U16(x) => Some(x as u64),
            Self::U32(x) => Some(x as u64),
            Self::U64(x) => Some(x),
            Self::I8(x) => u64::try_from(x).ok(),
            Self::I16(x) => u64::try_from(x).ok(),
            Self::I32(x) => u64::try_from(x).ok(),
            Self::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    /// Any integer type.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::I8(x) => Some(x as i64),
            Self::I16(x) => Some(x as i64),
            Self::I32(x) => Some(x as i64),
            Self::I64(x) => Some(x),
            Self::U64(x) => i64::try_from(x).ok(),
            _ => self.as_u64().map(|x| x as i64),
        }
    }

    /// Any float or integer type.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(x) => Some(x as f64),
            Self::F64(x) => Some(x),
            _ => self.as_i64().map(|x| x as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            Self::Array(a) => Some(a.items()),
            _ => None,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensor {
    pub name: String,
    /// ggml's `ne`: innermost (contiguous) dimension first.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

impl GgufTensor {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape outermost first, as HuggingFace and `.nbl` write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed, validated GGUF file. Tensor bytes stay in the map until asked
/// for.
pub struct GgufFile {
    path: PathBuf,
    map: Arc<Mmap>,
    version: u32,
    alignment: usize,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<GgufTensor>,
    by_name: HashMap<String, usize>,
}

/// Bounds-checked little-endian reads. Errors say what was being read and
/// where, because that is what tells a truncated file from a corrupt one.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// The map `bytes` is, for arrays to parse later.
    map: &'a Arc<Mmap>,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn fmt::Display) -> Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "file ends at byte {} while reading {what} ({n} bytes needed at offset {}; truncated?)",
                self.bytes.len(),
                self.pos
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn fmt::Display) -> Result<[u8; N], String> {
        Ok(self
            .take(N, what)?
            .try_into()
            .expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &dyn fmt::Display) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn fmt::Display) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A GGUF string (`u64` length, UTF-8 bytes) borrowed from the file.
    fn str(&mut self, what: &dyn fmt::Display) -> Result<&'a str, String> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(format!(
                "{what} at offset {at} claims {len} bytes but only {} remain (truncated or corrupt)",
                self.remaining()
            ));
        }
        let bytes = self.take(len as usize, what)?;
        std::str::from_utf8(bytes).map_err(|_| format!("{what} at offset {at} is not UTF-8"))
    }

    fn string(&mut self, what: &dyn fmt::Display) -> Result<String, String> {
        self.str(what).map(str::to_owned)
    }

    /// A value of type `ty`; `depth` counts enclosing arrays.
    fn value(
        &mut self,
        ty: u32,
        what: &dyn fmt::Display,
        depth: usize,
    ) -> Result<MetaValue, String> {
        Ok(match ty {
            vt::U8 => MetaValue::U8(u8::from_le_bytes(self.array(what)?)),
            vt::I8 => MetaValue::I8(i8::from_le_bytes(self.array(what)?)),
            vt::U16 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            vt::I16 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            vt::U32 => MetaValue::U32(self.u32(what)?),
            vt::I32 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            vt::F32 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            vt::U64 => MetaValue::U64(self.u64(what)?),
            vt::I64 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            vt::F64 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            vt::BOOL => {
                let at = self.pos;
                match self.array::<1>(what)?[0] {
                    0 => MetaValue::Bool(false),
                    1 => MetaValue::Bool(true),
                    b => {
                        return Err(format!(
                            "{what} at offset {at} is a bool with value {b}, not 0 or 1"
                        ))
                    }
                }
            }
            vt::STRING => MetaValue::Str(self.string(what)?),
            vt::ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!(
                        "{what} nests arrays more than {MAX_ARRAY_DEPTH} deep"
                    ));
                }
                let at = self.pos;
                let elem_type = self.u32(what)?;
                let count = self.u64(what)?;
                // Every element occupies at least this many bytes, so a count
                // the rest of the file cannot hold is rejected before any
                // allocation is sized by it.
                let min_size: u64 = match elem_type {
                    vt::U8 | vt::I8 | vt::BOOL => 1,
                    vt::U16 | vt::I16 => 2,
                    vt::U32 | vt::I32 | vt::F32 => 4,
                    vt::U64 | vt::I64 | vt::F64 | vt::STRING => 8,
                    vt::ARRAY => 12,
                    other => {
                        return Err(format!(
                            "{what} at offset {at} is an array of unknown value type {other}"
                        ))
                    }
                };
                if count > self.remaining() as u64 / min_size {
                    return Err(format!(
                        "{what} at offset {at} claims {count} {} elements but only {} bytes remain (truncated or corrupt)",
                        value_type_name(elem_type),
                        self.remaining()
                    ));
                }
                let start = self.pos;
                match elem_type {
                    // Fixed-size elements: every bit pattern is valid.
                    vt::U8
                    | vt::I8
                    | vt::U16
                    | vt::I16
                    | vt::U32
                    | vt::I32
                    | vt::F32
                    | vt::U64
                    | vt::I64
                    | vt::F64 => {
                        self.take((count * min_size) as usize, what)?;
                    }
                    _ => {
                        for i in 0..count {
                            self.skip(elem_type, &format_args!("{what}[{i}]"), depth + 1)?;
                        }
                    }
                }
                MetaValue::Array(MetaArray {
                    elem_type,
                    len: count,
                    map: self.map.clone(),
                    start,
                    depth,
                    items: OnceLock::new(),
                })
            }
            other => return Err(format!("{what} has unknown value type {other}")),
        })
    }
}

impl Cursor<'_> {
    /// Checks a value of type `ty` exactly as [`Cursor::value`] reads it and
    /// moves past it, allocating nothing.
    fn skip(&mut self, ty: u32, what: &dyn fmt::Display, depth: usize) -> Result<(), String> {
        match ty {
            vt::U8 | vt::I8 => self.take(1, what).map(drop),
            vt::U16 | vt::I16 => self.take(2, what).map(drop),
            vt::U32 | vt::I32 | vt::F32 => self.take(4, what).map(drop),
            vt::U64 | vt::I64 | vt::F64 => self.take(8, what).map(drop),
            vt::BOOL => {
                let at = self.pos;
                match self.array::<1>(what)?[0] {
                    0 | 1 => Ok(()),
                    b => Err(format!(
                        "{what} at offset {at} is a bool with value {b}, not 0 or 1"
                    )),
                }
            }
            vt::STRING => self.str(what).map(drop),
            // Validated (and its elements skipped) by `value`; the parsed
            // array is only a handle into the map.
            vt::ARRAY => self.value(ty, what, depth).map(drop),
            other => Err(format!("{what} has unknown value type {other}")),
        }
    }
}

fn align_up(x: usize, a: usize) -> Option<usize> {
    x.checked_add(a - 1).map(|v| v / a * a)
}

impl GgufFile {
    /// Maps and validates a GGUF file.
    pub fn open(path: &Path) -> Result<Self, ToolError> {
        let file =
            nibble::fsutil::open_regular_for_read(path).map_err(|e| crate::open_error(path, e))?;
        // SAFETY: a read-only private mapping of a model file that nobody
        // should be writing while it is imported. If another process did
        // modify it, we would read whatever bytes are there; every offset and
        // length taken from the file is validated against the mapping's
        // length before it is used, so no access goes out of bounds. (A file
        // truncated by someone else mid-read would raise SIGBUS, as for any
        // mmap reader; that is outside what a reader can prevent.)
        let map = unsafe { Mmap::map(&file, path) }
            .map_err(|e| ToolError::new(path, format!("cannot map: {e}")))?;
        Self::parse(path, map)
    }

    fn parse(path: &Path, map: Mmap) -> Result<Self, ToolError> {
        let map = Arc::new(map);
        let err = |m: String| ToolError::new(path, m);
        let mut c = Cursor {
            bytes: &map,
            pos: 0,
            map: &map,
        };
        let magic: [u8; 4] = c.array(&"the magic").map_err(|_| {
            err(format!(
                "only {} bytes: too short to be a GGUF file",
                map.len()
            ))
        })?;
        if magic != MAGIC {
            return Err(err(format!(
                "not a GGUF file (magic {:?}, expected \"GGUF\")",
                String::from_utf8_lossy(&magic)
            )));
        }
        let version = c.u32(&"the version").map_err(err)?;
        match version {
            2 | 3 => {}
            1 => return Err(err("GGUF version 1 is not supported (only 2 and 3); re-convert the model with a current llama.cpp".into())),
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
                return Err(err("big-endian GGUF files are not supported".into()))
            }
            v => return Err(err(format!("unknown GGUF version {v} (supported: 2 and 3)"))),
        }
        let n_tensors = c.u64(&"the tensor count").map_err(err)?;
        let n_kv = c.u64(&"the metadata count").map_err(err)?;

        // A key-value pair takes at least 8 (key length) + 4 (type) + 1 bytes.
        if n_kv > c.remaining() as u64 / 13 {
            return Err(err(format!(
                "header claims {n_kv} metadata entries, more than the file can hold (corrupt or truncated)"
            )));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c
                .string(&format_args!("the key of metadata entry {i}"))
                .map_err(err)?;
            let ty = c
                .u32(&format_args!(
                    "the type of metadata {}",
                    nibble::error::quote(&key)
                ))
                .map_err(err)?;
            let value = c
                .value(
                    ty,
                    &format_args!("metadata {}", nibble::error::quote(&key)),
                    0,
                )
                .map_err(err)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(err(format!(
                    "metadata key {} appears twice",
                    nibble::error::quote(&key)
                )));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(MetaValue::U32(a)) if *a > 0 && a.is_power_of_two() => *a as usize,
            Some(v) => {
                return Err(err(format!(
                    "'general.alignment' should be a power of two (u32), found {}",
                    brief(v)
                )))
            }
        };

        // A tensor info takes at least 8 (name length) + 4 + 4 + 8 bytes.
        if n_tensors > c.remaining() as u64 / 24 {
            return Err(err(format!(
                "header claims {n_tensors} tensors, more than the file can hold (corrupt or truncated)"
            )));
        }
        struct Info {
            name: String,
            dims: Vec<u64>,
            ty: GgmlType,
            offset: u64,
        }
        let mut infos = Vec::with_capacity(n_tensors as usize);
        let mut by_name = HashMap::new();
        for i in 0..n_tensors {
            let name = c
                .string(&format_args!("the name of tensor {i}"))
                .map_err(err)?;
            let what = format!("tensor {}", nibble::error::quote(&name));
            let n_dims = c.u32(&what).map_err(err)?;
            if n_dims == 0 || n_dims as usize > MAX_DIMS {
                return Err(err(format!(
                    "{what} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&what).map_err(err)?);
            }
            let type_id = c.u32(&what).map_err(err)?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| {
                let supported: Vec<_> = GgmlType::ALL.iter().map(|t| t.name()).collect();
                err(format!(
                    "{what} has type {} (id {type_id}), which nibble cannot import (supported: {})",
                    ggml_type_name(type_id).unwrap_or("unknown"),
                    supported.join(", ")
                ))
            })?;
            let offset = c.u64(&what).map_err(err)?;
            if by_name.insert(name.clone(), infos.len()).is_some() {
                return Err(err(format!("{what} appears twice in the tensor directory")));
            }
            infos.push(Info {
                name,
                dims,
                ty,
                offset,
            });
        }
        let data_start =
            align_up(c.pos, alignment).ok_or_else(|| err("tensor data offset overflows".into()))?;

        let mut tensors = Vec::with_capacity(infos.len());
        for Info {
            name,
            dims,
            ty,
            offset,
        } in infos
        {
            let what = format!("tensor {}", nibble::error::quote(&name));
            let n = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    err(format!(
                        "{what} has dimensions {dims:?}: empty or too large"
                    ))
                })?;
            if !dims[0].is_multiple_of(ty.block_len() as u64) {
                return Err(err(format!(
                    "{what} of type {ty} has rows of {} weights, not a multiple of its block size {}",
                    dims[0],
                    ty.block_len()
                )));
            }
            let len = ty
                .byte_len(n)
                .ok_or_else(|| err(format!("{what} has dimensions {dims:?}: size overflows")))?;
            if !offset.is_multiple_of(alignment as u64) {
                return Err(err(format!(
                    "{what} starts at data offset {offset}, not a multiple of the alignment {alignment}"
                )));
            }
            let start = (data_start as u64).checked_add(offset);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(s), Some(e)) if e <= map.len() as u64 => tensors.push(GgufTensor {
                    name,
                    dims,
                    ty,
                    start: s as usize,
                    end: e as usize,
                }),
                _ => {
                    return Err(err(format!(
                        "{what} ({len} bytes at data offset {offset}) extends past the end of the file at byte {} (truncated?)",
                        map.len()
                    )))
                }
            }
        }
        // Overlapping tensors mean a corrupt directory: importing them would
        // silently duplicate weights.
        let mut order: Vec<&GgufTensor> = tensors.iter().collect();
        order.sort_by_key(|t| t.start);
        for w in order.windows(2) {
            if w[1].start < w[0].end {
                return Err(err(format!(
                    "tensors {} and {} overlap (corrupt tensor directory)",
                    nibble::error::quote(&w[0].name),
                    nibble::error::quote(&w[1].name)
                )));
            }
        }
        Ok(Self {
            path: path.to_owned(),
            map,
            version,
            alignment,
            metadata,
            tensors,
            by_name,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> usize {
        self.alignment
    }

    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// The tensors in directory order.
    pub fn tensors(&self) -> &[GgufTensor] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The stored bytes of `t` (validated at open to lie within the file).
    pub fn bytes(&self, t: &GgufTensor) -> &[u8] {
        &self.map[t.start..t.end]
    }

    /// Tells the kernel the process is done with `t`'s bytes so their pages
    /// stop counting toward resident memory. Purely an optimization.
    pub fn release(&self, t: &GgufTensor) {
        // SAFETY: MADV_DONTNEED on a read-only, private, file-backed mapping
        // only drops page-table entries; the next access faults the same
        // file bytes back in, so live borrows keep seeing identical data.
        // The mapping is never written, so no private copy can be lost.
        let _ = unsafe {
            self.map
                .unchecked_advise_range(UncheckedAdvice::DontNeed, t.start, t.end - t.start)
        };
    }

    /// Tells the kernel `t` is about to be read front to back.
    pub fn will_read(&self, t: &GgufTensor) {
        let _ = self
            .map
            .advise_range(memmap2::Advice::Sequential, t.start, t.end - t.start);
    }

    /// An error about this file.
    pub fn error(&self, problem: impl fmt::Display) -> ToolError {
        ToolError::new(&self.path, problem)
    }

    /// An integer-valued key (any integer type).
    pub fn get_uint(&self, key: &str) -> Result<Option<u64>, ToolError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                self.error(format!(
                    "metadata '{key}' should be a non-negative integer, found {}",
                    brief(v)
                ))
            }),
        }
    }

    /// A number-valued key (any float or integer type).
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>, ToolError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                self.error(format!(
                    "metadata '{key}' should be a number, found {}",
                    brief(v)
                ))
            }),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, ToolError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                self.error(format!(
                    "metadata '{key}' should be a bool, found {}",
                    brief(v)
                ))
            }),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>, ToolError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| {
                self.error(format!(
                    "metadata '{key}' should be a string, found {}",
                    brief(v)
                ))
            }),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&[MetaValue]>, ToolError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_array().map(Some).ok_or_else(|| {
                self.error(format!(
                    "metadata '{key}' should be an array, found {}",
                    brief(v)
                ))
            }),
        }
    }
}

/// A value shortened for an error message (a 50k-entry array would not help).
pub(crate) fn brief(v: &MetaValue) -> String {
    match v {
        MetaValue::Array(a) => format!("an array of {} {}", a.len(), value_type_name(a.elem_type)),
        MetaValue::Str(s) => format!("the string {}", nibble::error::quote(s)),
        other => format!("{other:?}"),
    }
}
