//! Typed key/value metadata.
//!
//! Section layout: `count: u32`, then `count` entries of
//! `key (u16 len + UTF-8) | type: u8 | value_len: u64 | value bytes`.
//! The explicit length lets a reader skip values of types it does not know.

use super::{invalid, put_name, Cursor, FormatError};
use crate::error::quote;
use std::collections::BTreeMap;

/// Well-known keys. Architecture keys use HuggingFace's LLaMA config names.
pub mod keys {
    pub const ARCHITECTURE: &str = "general.architecture";
    pub const VOCAB_SIZE: &str = "llama.vocab_size";
    pub const HIDDEN_SIZE: &str = "llama.hidden_size";
    pub const NUM_LAYERS: &str = "llama.num_hidden_layers";
    pub const NUM_HEADS: &str = "llama.num_attention_heads";
    pub const NUM_KV_HEADS: &str = "llama.num_key_value_heads";
    pub const HEAD_DIM: &str = "llama.head_dim";
    pub const INTERMEDIATE_SIZE: &str = "llama.intermediate_size";
    pub const ROPE_THETA: &str = "llama.rope_theta";
    /// "none" or "linear".
    pub const ROPE_SCALING_TYPE: &str = "llama.rope_scaling.type";
    pub const ROPE_SCALING_FACTOR: &str = "llama.rope_scaling.factor";
    pub const RMS_NORM_EPS: &str = "llama.rms_norm_eps";
    pub const CONTEXT_LENGTH: &str = "llama.max_position_embeddings";
    pub const TIE_WORD_EMBEDDINGS: &str = "llama.tie_word_embeddings";
    pub const TOKENIZER_JSON: &str = "tokenizer.json";
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
    pub const BOS_TOKEN_ID: &str = "tokenizer.bos_token_id";
    pub const EOS_TOKEN_IDS: &str = "tokenizer.eos_token_ids";
    pub const ADD_BOS_TOKEN: &str = "tokenizer.add_bos_token";
    pub const BOS_TOKEN: &str = "tokenizer.bos_token";
    pub const EOS_TOKEN: &str = "tokenizer.eos_token";
    pub const SOURCE_FILES: &str = "provenance.source_files";
    pub const CONVERTER: &str = "provenance.converter";
    pub const QUANTIZATION: &str = "provenance.quantization";
    /// The checkpoint's declared dtype (`torch_dtype`/`dtype`), informational.
    pub const SOURCE_DTYPE: &str = "provenance.source_dtype";
}

/// A metadata value. Type ids are in [`Value::type_id`].
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U32(u32),
    U64(u64),
    F32(f32),
    Bool(bool),
    Str(String),
    U32Array(Vec<u32>),
    StrArray(Vec<String>),
    /// A string stored zlib-compressed (type 7): for the large, repetitive
    /// `tokenizer.json`, whose 1.5 MB in a small model would otherwise cost
    /// as much as a tensor's worth of extra bits. Read, it is a string like
    /// any other ([`Metadata::get_str`]).
    PackedStr(String),
}

/// The most bytes all packed strings of one file may inflate to together
/// (64 MiB; the largest real `tokenizer.json`s are a few tens of MB). The
/// declared lengths are checked against it before anything is inflated, so
/// a hostile file cannot make tiny streams expand without bound, one or many.
pub const MAX_PACKED_TOTAL_LEN: u64 = 1 << 26;

/// The longest packed string a reader accepts: the total limit
/// ([`MAX_PACKED_TOTAL_LEN`]) applies to one string too.
pub const MAX_PACKED_STR_LEN: u64 = MAX_PACKED_TOTAL_LEN;

impl Value {
    /// The value for an error message: numbers as they are, strings quoted
    /// and cut short ([`quote`]), arrays by their length.
    pub fn brief(&self) -> String {
        match self {
            Self::Str(s) => format!("the string {}", quote(s)),
            Self::PackedStr(s) => format!("the packed string {}", quote(s)),
            Self::U32Array(v) => format!("an array of {} u32", v.len()),
            Self::StrArray(v) => format!("an array of {} strings", v.len()),
            Self::U32(x) => format!("the u32 {x}"),
            Self::U64(x) => format!("the u64 {x}"),
            Self::F32(x) => format!("the f32 {x}"),
            Self::Bool(x) => format!("the bool {x}"),
        }
    }

    pub fn type_id(&self) -> u8 {
        match self {
            Self::U32(_) => 0,
            Self::U64(_) => 1,
            Self::F32(_) => 2,
            Self::Bool(_) => 3,
            Self::Str(_) => 4,
            Self::U32Array(_) => 5,
            Self::StrArray(_) => 6,
            Self::PackedStr(_) => 7,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Self::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Self::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Self::Bool(v) => out.push(*v as u8),
            Self::Str(s) => out.extend_from_slice(s.as_bytes()),
            Self::U32Array(v) => {
                out.extend_from_slice(&(v.len() as u64).to_le_bytes());
                for x in v {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
            Self::StrArray(v) => {
                out.extend_from_slice(&(v.len() as u64).to_le_bytes());
                for s in v {
                    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
                    out.extend_from_slice(s.as_bytes());
                }
            }
            Self::PackedStr(s) => {
                out.extend_from_slice(&(s.len() as u64).to_le_bytes());
                let mut z = flate2::write::ZlibEncoder::new(out, flate2::Compression::best());
                // Writing into a Vec cannot fail.
                std::io::Write::write_all(&mut z, s.as_bytes()).expect("in-memory write");
                z.finish().expect("in-memory write");
            }
        }
    }

    /// Decodes a value of type `ty` filling exactly `bytes`; `Ok(None)` for a
    /// type id this version does not know.
    fn decode(ty: u8, bytes: &[u8], key: &str) -> Result<Option<Self>, FormatError> {
        let bad = |what: &str| FormatError::Invalid(format!("metadata {}: {what}", quote(key)));
        let fixed = |n: usize| -> Result<(), FormatError> {
            if bytes.len() == n {
                Ok(())
            } else {
                Err(bad(&format!("expected {n} bytes, found {}", bytes.len())))
            }
        };
        let utf8 = |b: &[u8]| -> Result<String, FormatError> {
            match std::str::from_utf8(b) {
                Ok(s) => Ok(s.to_owned()),
                Err(_) => Err(bad("string is not UTF-8")),
            }
        };
        Ok(Some(match ty {
            0 => {
                fixed(4)?;
                Self::U32(u32::from_le_bytes(bytes.try_into().unwrap()))
            }
            1 => {
                fixed(8)?;
                Self::U64(u64::from_le_bytes(bytes.try_into().unwrap()))
            }
            2 => {
                fixed(4)?;
                Self::F32(f32::from_le_bytes(bytes.try_into().unwrap()))
            }
            3 => {
                fixed(1)?;
                match bytes[0] {
                    0 => Self::Bool(false),
                    1 => Self::Bool(true),
                    b => return Err(bad(&format!("bool byte is {b}, not 0 or 1"))),
                }
            }
            4 => Self::Str(utf8(bytes)?),
            5 => {
                let mut c = Cursor::new(bytes, "metadata array");
                let n = c.u64()?;
                if n.checked_mul(4) != Some(c.remaining() as u64) {
                    return Err(bad("array length does not match its byte length"));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(c.u32()?);
                }
                Self::U32Array(v)
            }
            6 => {
                let mut c = Cursor::new(bytes, "metadata string array");
                let n = c.u64()?;
                // Each string takes at least 8 bytes, which bounds the count
                // before anything is allocated.
                if n > c.remaining() as u64 / 8 {
                    return Err(bad("string array count exceeds its byte length"));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let len = c.u64()?;
                    if len > c.remaining() as u64 {
                        return Err(bad("string runs past the value"));
                    }
                    v.push(utf8(c.take(len as usize)?)?);
                }
                if c.remaining() != 0 {
                    return Err(bad("trailing bytes after string array"));
                }
                Self::StrArray(v)
            }
            _ => return Ok(None),
        }))
    }
}

/// A packed string as stored: inflated on first access, so keys nobody
/// reads never cost their inflated size.
#[derive(Clone, Debug)]
struct Packed {
    len: u64,
    stream: Box<[u8]>,
}

impl Packed {
    /// Splits a type-7 value into its declared length and zlib stream.
    fn parse(bytes: &[u8], key: &str) -> Result<Self, FormatError> {
        let mut c = Cursor::new(bytes, "metadata packed string");
        let len = c.u64()?;
        if len > MAX_PACKED_STR_LEN {
            return invalid(format!(
                "metadata {}: packed string of {len} bytes exceeds the \
                 {MAX_PACKED_STR_LEN}-byte limit",
                quote(key)
            ));
        }
        let stream = c.take(c.remaining())?.into();
        Ok(Self { len, stream })
    }

    fn inflate(&self, key: &str) -> Result<Value, String> {
        let bad = |what: &str| format!("metadata {}: {what}", quote(key));
        let bytes = inflate(&self.stream, self.len as usize).map_err(|e| bad(&e))?;
        match String::from_utf8(bytes) {
            Ok(s) => Ok(Value::PackedStr(s)),
            Err(_) => Err(bad("string is not UTF-8")),
        }
    }
}

/// One metadata value: decoded, or (a packed string read from a file) to be
/// inflated on first access.
#[derive(Clone, Debug)]
struct Entry {
    value: std::sync::OnceLock<Result<Value, String>>,
    packed: Option<Packed>,
}

impl Entry {
    fn ready(v: Value) -> Self {
        Self {
            value: std::sync::OnceLock::from(Ok(v)),
            packed: None,
        }
    }

    fn packed(p: Packed) -> Self {
        Self {
            value: std::sync::OnceLock::new(),
            packed: Some(p),
        }
    }

    fn resolve(&self, key: &str) -> Result<&Value, FormatError> {
        let r = self.value.get_or_init(|| match &self.packed {
            Some(p) => p.inflate(key),
            None => Err(format!("metadata {} has no value", quote(key))),
        });
        r.as_ref().map_err(|e| FormatError::Invalid(e.clone()))
    }
}

/// Inflates a zlib stream that must fill `stream` exactly and yield exactly
/// `len` bytes.
fn inflate(stream: &[u8], len: usize) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut z = flate2::read::ZlibDecoder::new(stream);
    // Grow as the stream really produces bytes rather than trusting `len`.
    let mut out = Vec::with_capacity(len.min(stream.len().saturating_mul(8)));
    (&mut z)
        .take(len as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("packed string does not inflate: {e}"))?;
    if out.len() > len {
        return Err(format!(
            "packed string inflates to more than the {len} bytes its header says"
        ));
    }
    if out.len() < len {
        return Err(format!(
            "packed string inflates to {} bytes, its header says {len}",
            out.len()
        ));
    }
    if z.total_in() != stream.len() as u64 {
        return Err("trailing bytes after the packed string's zlib stream".into());
    }
    Ok(out)
}

/// Ordered metadata. Unknown keys are kept (and ignored by the runtime);
/// values of unknown types are skipped on read. Packed strings read from a
/// file are inflated when first accessed ([`Metadata::try_get`] and the typed
/// getters report a stream that does not inflate); [`Metadata::check`]
/// inflates them all.
#[derive(Clone, Debug, Default)]
pub struct Metadata {
    entries: BTreeMap<String, Entry>,
}

impl PartialEq for Metadata {
    /// Equal keys with equal values (packed strings compared inflated).
    fn eq(&self, other: &Self) -> bool {
        self.entries.len() == other.entries.len()
            && self.entries.keys().all(|k| {
                other.entries.contains_key(k) && self.try_get(k).ok() == other.try_get(k).ok()
            })
    }
}

impl Metadata {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&mut self, key: &str, value: Value) {
        self.entries.insert(key.to_owned(), Entry::ready(value));
    }

    /// The value of `key`; `None` also for a packed string that does not
    /// inflate (see [`Metadata::try_get`]).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.try_get(key).ok().flatten()
    }

    /// The value of `key`, inflating a packed string on first access.
    pub fn try_get(&self, key: &str) -> Result<Option<&Value>, FormatError> {
        match self.entries.get(key) {
            None => Ok(None),
            Some(e) => e.resolve(key).map(Some),
        }
    }

    /// Inflates every packed string (what `verify` checks): the first that
    /// does not inflate to its declared UTF-8 is an error.
    pub fn check(&self) -> Result<(), FormatError> {
        for (k, e) in &self.entries {
            e.resolve(k)?;
        }
        Ok(())
    }

    /// Removes `key`, returning its value (`None` if it does not inflate).
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let e = self.entries.remove(key)?;
        e.resolve(key).ok()?;
        e.value.into_inner()?.ok()
    }

    /// Every entry whose value can be had, in key order (inflating packed
    /// strings; one that does not inflate is left out, [`Metadata::check`]
    /// reports it).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries
            .iter()
            .filter_map(|(k, e)| Some((k.as_str(), e.resolve(k).ok()?)))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn typed<'s, T>(
        &'s self,
        key: &str,
        want: &str,
        pick: impl Fn(&'s Value) -> Option<T>,
    ) -> Result<Option<T>, FormatError> {
        match self.try_get(key)? {
            None => Ok(None),
            Some(v) => match pick(v) {
                Some(t) => Ok(Some(t)),
                None => invalid(format!(
                    "metadata {} should be {want}, found {}",
                    quote(key),
                    v.brief()
                )),
            },
        }
    }

    /// An unsigned integer (stored as u32 or u64), or an error if the key holds
    /// another type.
    pub fn get_uint(&self, key: &str) -> Result<Option<u64>, FormatError> {
        self.typed(key, "an unsigned integer", |v| match v {
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            _ => None,
        })
    }

    pub fn get_f32(&self, key: &str) -> Result<Option<f32>, FormatError> {
        self.typed(key, "an f32", |v| match v {
            Value::F32(x) => Some(*x),
            _ => None,
        })
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, FormatError> {
        self.typed(key, "a bool", |v| match v {
            Value::Bool(x) => Some(*x),
            _ => None,
        })
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>, FormatError> {
        self.typed(key, "a string", |v| match v {
            Value::Str(x) | Value::PackedStr(x) => Some(x.as_str()),
            _ => None,
        })
    }

    pub fn get_u32_array(&self, key: &str) -> Result<Option<&[u32]>, FormatError> {
        self.typed(key, "a u32 array", |v| match v {
            Value::U32Array(x) => Some(x.as_slice()),
            _ => None,
        })
    }

    pub fn get_str_array(&self, key: &str) -> Result<Option<&[String]>, FormatError> {
        self.typed(key, "a string array", |v| match v {
            Value::StrArray(x) => Some(x.as_slice()),
            _ => None,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        let mut buf = Vec::new();
        for (k, e) in &self.entries {
            put_name(&mut out, k);
            buf.clear();
            match (&e.packed, e.value.get()) {
                // As read: the stored stream, not a recompression.
                (Some(p), _) => {
                    out.push(7);
                    buf.extend_from_slice(&p.len.to_le_bytes());
                    buf.extend_from_slice(&p.stream);
                }
                (None, Some(Ok(v))) => {
                    out.push(v.type_id());
                    v.encode(&mut buf);
                }
                (None, _) => unreachable!("an entry without a packed stream has its value"),
            }
            out.extend_from_slice(&(buf.len() as u64).to_le_bytes());
            out.extend_from_slice(&buf);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let mut c = Cursor::new(bytes, "metadata section");
        let count = c.u32()?;
        let mut entries = BTreeMap::new();
        // Keys of skipped (unknown-type) entries count too: a key is unique
        // whatever its type.
        let mut skipped = std::collections::HashSet::new();
        let mut packed_total = 0u64;
        for _ in 0..count {
            let key = c.name()?;
            let ty = c.u8()?;
            let len = c.u64()?;
            if len > c.remaining() as u64 {
                return invalid(format!(
                    "metadata {}: value of {len} bytes runs past the section",
                    quote(key)
                ));
            }
            let raw = c.take(len as usize)?;
            let entry = if ty == 7 {
                let p = Packed::parse(raw, key)?;
                packed_total += p.len;
                if packed_total > MAX_PACKED_TOTAL_LEN {
                    return invalid(format!(
                        "metadata {}: packed strings inflate to more than the \
                         {MAX_PACKED_TOTAL_LEN}-byte limit of one file",
                        quote(key)
                    ));
                }
                Some(Entry::packed(p))
            } else {
                Value::decode(ty, raw, key)?.map(Entry::ready)
            };
            let repeated = match entry {
                Some(v) => entries.insert(key.to_owned(), v).is_some() || skipped.contains(key),
                None => !skipped.insert(key) || entries.contains_key(key),
            };
            if repeated {
                return invalid(format!("metadata key {} appears twice", quote(key)));
            }
        }
        if c.remaining() != 0 {
            return invalid("trailing bytes after the metadata entries");
        }
        Ok(Self { entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_type() {
        let mut m = Metadata::new();
        m.set("a", Value::U32(7));
        m.set("b", Value::U64(1 << 40));
        m.set("c", Value::F32(1e-5));
        m.set("d", Value::Bool(true));
        m.set("e", Value::Str("héllo".into()));
        m.set("f", Value::U32Array(vec![1, 2, 3]));
        m.set("g", Value::StrArray(vec!["x".into(), "".into()]));
        m.set("h", Value::PackedStr("wörd ".repeat(1000)));
        m.set("i", Value::PackedStr(String::new()));
        let bytes = m.encode();
        assert!(
            bytes.len() < 1000,
            "the repetitive string is stored compressed"
        );
        let back = Metadata::decode(&bytes).unwrap();
        assert_eq!(back, m);
        assert_eq!(
            back.get_str("h").unwrap(),
            Some("wörd ".repeat(1000).as_str())
        );
    }

    /// One packed-string entry with the declared length and stream given.
    fn packed_entry(len: u64, stream: &[u8]) -> Vec<u8> {
        let mut bytes = 1u32.to_le_bytes().to_vec();
        put_name(&mut bytes, "k");
        bytes.push(7);
        bytes.extend_from_slice(&(8 + stream.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(stream);
        bytes
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut z, data).unwrap();
        z.finish().unwrap()
    }

    #[test]
    fn hostile_packed_strings_are_errors() {
        let text = "abc".repeat(100);
        let z = zlib(text.as_bytes());
        assert!(Metadata::decode(&packed_entry(300, &z)).is_ok());
        // Declared lengths are refused at decode, streams when inflated.
        let err = |b: Vec<u8>| match Metadata::decode(&b) {
            Err(e) => e.to_string(),
            Ok(m) => {
                assert!(m.get("k").is_none() && m.iter().next().is_none());
                m.check().unwrap_err().to_string()
            }
        };
        assert!(err(packed_entry(299, &z)).contains("more than the 299 bytes"));
        assert!(err(packed_entry(301, &z)).contains("its header says 301"));
        assert!(err(packed_entry(u64::MAX, &z)).contains("limit"));
        assert!(err(packed_entry(300, &z[..z.len() - 1])).contains("inflate"));
        let mut bad_sum = z.clone();
        *bad_sum.last_mut().unwrap() ^= 1;
        assert!(err(packed_entry(300, &bad_sum)).contains("inflate"));
        let mut trailing = z.clone();
        trailing.push(0);
        assert!(err(packed_entry(300, &trailing)).contains("trailing"));
        assert!(err(packed_entry(0, &[])).contains("inflate"));
        // Inflates fine, but not to UTF-8.
        assert!(err(packed_entry(2, &zlib(&[0xff, 0xfe]))).contains("UTF-8"));
    }

    /// Metadata of packed-string entries `k0, k1, ...`, each declaring `len`.
    fn packed_entries(n: u32, len: u64, stream: &[u8]) -> Vec<u8> {
        let mut bytes = n.to_le_bytes().to_vec();
        for i in 0..n {
            put_name(&mut bytes, &format!("k{i}"));
            bytes.push(7);
            bytes.extend_from_slice(&(8 + stream.len() as u64).to_le_bytes());
            bytes.extend_from_slice(&len.to_le_bytes());
            bytes.extend_from_slice(stream);
        }
        bytes
    }

    #[test]
    fn packed_strings_are_capped_in_total() {
        // 12 bombs of 256 MiB were 3.3 GB of memory: refused before inflating.
        let err = Metadata::decode(&packed_entries(12, 1 << 28, &[])).unwrap_err();
        assert!(err.to_string().contains("limit"), "{err}");
        // Two strings of 40 MiB each are within the per-string limit but not
        // the total one; the refusal comes before any inflation.
        let t = std::time::Instant::now();
        let bomb = zlib(&vec![b' '; 40 << 20]);
        let err = Metadata::decode(&packed_entries(2, 40 << 20, &bomb)).unwrap_err();
        assert!(err.to_string().contains("'k1'"), "{err}");
        assert!(err.to_string().contains("limit of one file"), "{err}");
        // One is fine.
        let m = Metadata::decode(&packed_entries(1, 40 << 20, &bomb)).unwrap();
        assert_eq!(m.get_str("k0").unwrap().unwrap().len(), 40 << 20);
        assert!(t.elapsed().as_secs() < 30);
    }

    #[test]
    fn packed_strings_inflate_only_when_read() {
        let mut bytes = packed_entries(1, 300, b"not zlib at all");
        // Plus a key the runtime reads.
        bytes[..4].copy_from_slice(&2u32.to_le_bytes());
        put_name(&mut bytes, "known");
        bytes.push(0);
        bytes.extend_from_slice(&4u64.to_le_bytes());
        bytes.extend_from_slice(&9u32.to_le_bytes());
        let m = Metadata::decode(&bytes).unwrap();
        assert_eq!(m.get_uint("known").unwrap(), Some(9));
        assert!(m.get_str("k0").unwrap_err().to_string().contains("inflate"));
        assert!(m.check().is_err());
        // Written back as read.
        assert_eq!(m.encode(), bytes);
    }

    #[test]
    fn unknown_types_are_skipped() {
        let mut bytes = 2u32.to_le_bytes().to_vec();
        put_name(&mut bytes, "future");
        bytes.push(200);
        bytes.extend_from_slice(&3u64.to_le_bytes());
        bytes.extend_from_slice(&[1, 2, 3]);
        put_name(&mut bytes, "known");
        bytes.push(0);
        bytes.extend_from_slice(&4u64.to_le_bytes());
        bytes.extend_from_slice(&9u32.to_le_bytes());
        let m = Metadata::decode(&bytes).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m.get_uint("known").unwrap(), Some(9));
    }

    #[test]
    fn hostile_lengths_are_errors() {
        let mut bytes = 1u32.to_le_bytes().to_vec();
        put_name(&mut bytes, "k");
        bytes.push(6);
        bytes.extend_from_slice(&8u64.to_le_bytes());
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(Metadata::decode(&bytes).is_err());
        assert!(Metadata::decode(&u32::MAX.to_le_bytes()).is_err());
    }

    #[test]
    fn wrong_type_is_an_error() {
        let mut m = Metadata::new();
        m.set("k", Value::Str("x".into()));
        assert!(m.get_uint("k").is_err());
        assert_eq!(m.get_uint("missing").unwrap(), None);
    }
}
