//! The `.nbl` container: a fixed header, a data section of aligned tensors,
//! then typed metadata and a tensor directory. `format-spec/SPEC.md` is the
//! byte-exact description; this module is its reference implementation.
//!
//! ```text
//! 0      header (HEADER_LEN bytes), zero padding up to DATA_ALIGN
//! D      data section: tensors, each at an offset that is a multiple of TENSOR_ALIGN
//! M      metadata section
//! T      tensor directory
//! ```
//! Data comes first so the writer can stream tensors without knowing their
//! checksums in advance; the header, written last, points at everything.

mod metadata;
pub mod names;
mod reader;
mod writer;

pub use metadata::{keys, Metadata, Value};
pub use reader::{NblFile, TensorInfo, TensorView};
pub use writer::NblWriter;

use crate::error::quote;
use std::fmt;

/// First four bytes of every `.nbl` file.
pub const MAGIC: [u8; 4] = *b"NBL\x1a";
/// Readers reject any other major version.
pub const VERSION_MAJOR: u16 = 1;
/// Minor versions only add metadata keys, value types or tensor types;
/// readers accept any. 1.1 added the packed (zlib) string value type.
pub const VERSION_MINOR: u16 = 1;
pub const HEADER_LEN: usize = 80;
/// The data section starts on a page boundary so it can be mapped on its own.
pub const DATA_ALIGN: u64 = 4096;
/// Every tensor starts at a multiple of this, relative to the file start:
/// enough for aligned 512-bit loads.
pub const TENSOR_ALIGN: u64 = 64;
/// Most dimensions a tensor may have.
pub const MAX_DIMS: usize = 4;
/// Longest tensor name or metadata key, in bytes.
pub const MAX_NAME_LEN: usize = 1024;

/// Errors from reading or writing a container, each naming what went wrong.
#[derive(Debug)]
pub enum FormatError {
    Io(std::io::Error),
    /// The bytes do not form a valid `.nbl` file.
    Invalid(String),
    /// A valid file this version of nibble cannot read.
    Unsupported(String),
    /// A tensor's data does not match its checksum.
    Checksum {
        tensor: String,
    },
    /// Another error, in the named file.
    InFile {
        path: std::path::PathBuf,
        source: Box<FormatError>,
    },
}

impl FormatError {
    /// Prefixes the error with the file it happened in.
    pub fn in_file(self, path: &std::path::Path) -> Self {
        match self {
            e @ Self::InFile { .. } => e,
            e => Self::InFile {
                path: path.to_owned(),
                source: Box::new(e),
            },
        }
    }
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Invalid(m) => write!(f, "not a valid .nbl file: {m}"),
            Self::Unsupported(m) => write!(f, "unsupported .nbl file: {m}"),
            Self::Checksum { tensor } => {
                write!(
                    f,
                    "checksum mismatch in tensor {} (file corrupted)",
                    quote(tensor)
                )
            }
            Self::InFile { path, source } => write!(f, "{}: {source}", path.display()),
        }
    }
}

impl std::error::Error for FormatError {}

impl From<std::io::Error> for FormatError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

pub(crate) fn invalid<T>(msg: impl Into<String>) -> Result<T, FormatError> {
    Err(FormatError::Invalid(msg.into()))
}

/// The fixed-size header at offset 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version_major: u16,
    pub version_minor: u16,
    /// Bits 0..16 are required features (a reader rejects any it does not
    /// know); bits 16..32 are optional hints it may ignore. None are defined
    /// in v1.0.
    pub flags: u32,
    pub tensor_count: u32,
    pub data_offset: u64,
    pub data_len: u64,
    pub metadata_offset: u64,
    pub metadata_len: u64,
    pub directory_offset: u64,
    pub directory_len: u64,
    pub metadata_crc32: u32,
    pub directory_crc32: u32,
}

const REQUIRED_FLAGS_MASK: u32 = 0x0000_ffff;

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version_major.to_le_bytes());
        b[6..8].copy_from_slice(&self.version_minor.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.tensor_count.to_le_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.data_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.metadata_offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.metadata_len.to_le_bytes());
        b[48..56].copy_from_slice(&self.directory_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.directory_len.to_le_bytes());
        b[64..68].copy_from_slice(&self.metadata_crc32.to_le_bytes());
        b[68..72].copy_from_slice(&self.directory_crc32.to_le_bytes());
        let crc = crc32fast::hash(&b[0..72]);
        b[72..76].copy_from_slice(&crc.to_le_bytes());
        // 76..80 reserved, zero.
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        if b.len() < HEADER_LEN {
            return invalid(format!(
                "file is {} bytes, shorter than the {HEADER_LEN}-byte header",
                b.len()
            ));
        }
        if b[0..4] != MAGIC {
            return invalid("bad magic (not a .nbl file)");
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let version_major = u16_at(4);
        if version_major != VERSION_MAJOR {
            return Err(FormatError::Unsupported(format!(
                "format version {version_major}.{}, this nibble reads version {VERSION_MAJOR}.x",
                u16_at(6)
            )));
        }
        if u32_at(72) != crc32fast::hash(&b[0..72]) {
            return invalid("header checksum mismatch (file corrupted)");
        }
        // Not covered by the header checksum, so they must be checked here for
        // a corrupted byte to be noticed; v1 gives them no meaning.
        if b[76..80] != [0; 4] {
            return invalid("reserved header bytes 76..80 are not zero");
        }
        let flags = u32_at(8);
        if flags & REQUIRED_FLAGS_MASK != 0 {
            return Err(FormatError::Unsupported(format!(
                "required feature flags {:#06x} are unknown to this nibble",
                flags & REQUIRED_FLAGS_MASK
            )));
        }
        Ok(Self {
            version_major,
            version_minor: u16_at(6),
            flags,
            tensor_count: u32_at(12),
            data_offset: u64_at(16),
            data_len: u64_at(24),
            metadata_offset: u64_at(32),
            metadata_len: u64_at(40),
            directory_offset: u64_at(48),
            directory_len: u64_at(56),
            metadata_crc32: u32_at(64),
            directory_crc32: u32_at(68),
        })
    }
}

/// A little-endian cursor over untrusted bytes: every read is bounds-checked
/// and reports what it was reading when the bytes ran out.
pub(crate) struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Self {
            bytes,
            pos: 0,
            what,
        }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if n > self.remaining() {
            return invalid(format!(
                "{} truncated: needs {n} more bytes at offset {}, has {}",
                self.what,
                self.pos,
                self.remaining()
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    /// A u16-length-prefixed UTF-8 name of at most [`MAX_NAME_LEN`] bytes.
    pub(crate) fn name(&mut self) -> Result<&'a str, FormatError> {
        let len = self.u16()? as usize;
        if len > MAX_NAME_LEN {
            return invalid(format!("{}: name of {len} bytes is too long", self.what));
        }
        std::str::from_utf8(self.take(len)?)
            .or_else(|_| invalid(format!("{}: name is not UTF-8", self.what)))
    }
}

pub(crate) fn put_name(out: &mut Vec<u8>, name: &str) {
    assert!(name.len() <= MAX_NAME_LEN, "name too long: {name}");
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
}

/// Rounds `x` up to a multiple of `align` (a power of two).
pub(crate) fn align_up(x: u64, align: u64) -> u64 {
    (x + align - 1) & !(align - 1)
}
