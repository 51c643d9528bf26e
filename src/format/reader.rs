//! Reader: maps the file and validates every structural fact before handing
//! out views, so later code can index tensor data without further checks.
//! Tensor checksums are checked by [`NblFile::verify_checksums`], not at open:
//! that would read every page of a multi-gigabyte file before the first token.

use super::{
    invalid, Cursor, FormatError, Header, Metadata, DATA_ALIGN, HEADER_LEN, MAX_DIMS, TENSOR_ALIGN,
};
use crate::error::quote;
use crate::mapped_file_guard::Mmap;
use crate::quant::{TensorType, WeightView};
use std::collections::HashMap;
use std::ops::Deref;
use std::path::Path;

/// One row of the tensor directory.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// The raw type id; [`TensorInfo::tensor_type`] is `None` when this
    /// version of nibble does not know it.
    pub type_id: u32,
    pub tensor_type: Option<TensorType>,
    pub shape: Vec<u64>,
    /// Absolute offset of the data in the file.
    pub offset: u64,
    pub len: u64,
    pub crc32: u32,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// Bytes of a whole file: a memory map, or an owned buffer (for tests and
/// fuzzing).
enum Backing {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Mapped(m) => m,
            Self::Owned(v) => v,
        }
    }
}

/// An open, validated `.nbl` file (example at [`NblWriter`](super::NblWriter)).
pub struct NblFile {
    bytes: Backing,
    header: Header,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
}

/// A tensor's directory entry and its bytes, borrowed from the file.
#[derive(Clone, Copy)]
pub struct TensorView<'a> {
    pub info: &'a TensorInfo,
    pub bytes: &'a [u8],
}

impl<'a> TensorView<'a> {
    fn known_type(&self) -> Result<TensorType, FormatError> {
        self.info.tensor_type.ok_or_else(|| {
            FormatError::Unsupported(format!(
                "tensor {} has type id {}, unknown to this nibble",
                quote(&self.info.name),
                self.info.type_id
            ))
        })
    }

    /// The tensor as a `[rows, cols]` weight matrix.
    pub fn matrix(&self) -> Result<WeightView<'a>, FormatError> {
        let ty = self.known_type()?;
        let [rows, cols] = self.info.shape[..] else {
            return invalid(format!(
                "tensor {} has shape {:?}, expected a matrix",
                quote(&self.info.name),
                self.info.shape
            ));
        };
        WeightView::from_bytes(ty, rows as usize, cols as usize, self.bytes).ok_or_else(|| {
            FormatError::Invalid(format!("tensor {} is misaligned", quote(&self.info.name)))
        })
    }

    /// An f32 tensor of any shape as a flat slice.
    pub fn f32s(&self) -> Result<&'a [f32], FormatError> {
        if self.known_type()? != TensorType::F32 {
            return invalid(format!(
                "tensor {} is {}, expected f32",
                quote(&self.info.name),
                self.known_type()?
            ));
        }
        bytemuck::try_cast_slice(self.bytes)
            .or_else(|_| invalid(format!("tensor {} is misaligned", quote(&self.info.name))))
    }
}

impl NblFile {
    /// Maps and validates the file. Errors name the file. A FIFO, device or
    /// directory is refused before it is opened for reading (so it never
    /// blocks).
    pub fn open(path: &Path) -> Result<Self, FormatError> {
        let open = || -> Result<Self, FormatError> {
            let file = crate::fsutil::open_regular_for_read(path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::IsADirectory {
                    std::io::Error::new(e.kind(), "is a directory, not a .nbl file")
                } else {
                    e
                }
            })?;
            // SAFETY: the map is read-only and private to this process. The
            // one hazard of file maps, another process truncating or
            // rewriting the file while mapped, cannot be excluded by any
            // library; like every mmap-based runtime we document that a model
            // file must not be modified while in use. The writer never
            // rewrites a file in place (it renames a new one over it), so our
            // own tools do not trigger it.
            let map = unsafe { Mmap::map(&file, path)? };
            let parsed = Self::parse(Backing::Mapped(map))?;
            parsed.release_decoded_sections();
            Ok(parsed)
        };
        open().map_err(|e| e.in_file(path))
    }

    /// Drops the mapped pages of the metadata and directory from memory:
    /// both were read once (checksum, decoding) and live on as owned values,
    /// so keeping them resident would count the tokenizer.json, megabytes on
    /// large vocabularies, twice. Only whole pages inside each section are
    /// released, never a page shared with tensor data.
    fn release_decoded_sections(&self) {
        #[cfg(unix)]
        if let Backing::Mapped(map) = &self.bytes {
            // An upper bound on the page size of every supported platform
            // (4 KiB on x86-64, up to 64 KiB on aarch64).
            const PAGE: u64 = 64 << 10;
            let h = &self.header;
            for (off, len) in [
                (h.metadata_offset, h.metadata_len),
                (h.directory_offset, h.directory_len),
            ] {
                let start = off.div_ceil(PAGE) * PAGE;
                let end = (off + len) / PAGE * PAGE;
                if end > start {
                    // SAFETY: the map is private and read-only, so MADV_DONTNEED
                    // cannot discard data: a later read of these pages faults
                    // them in again from the file. No reference into the range
                    // outlives this call except through `self.bytes`, whose
                    // contents are unchanged by the advice. The range lies
                    // within the map (sections were bounds-checked by `parse`).
                    let _ = unsafe {
                        map.unchecked_advise_range(
                            memmap2::UncheckedAdvice::DontNeed,
                            start as usize,
                            (end - start) as usize,
                        )
                    };
                }
            }
        }
    }

    /// Validates a file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, FormatError> {
        Self::parse(Backing::Owned(bytes))
    }

    fn parse(bytes: Backing) -> Result<Self, FormatError> {
        if cfg!(target_endian = "big") {
            return Err(FormatError::Unsupported(
                "nibble reads .nbl files only on little-endian machines".into(),
            ));
        }
        let header = Header::decode(&bytes)?;
        let file_len = bytes.len() as u64;
        let section = |name: &str, off: u64, len: u64| -> Result<(u64, u64), FormatError> {
            match off.checked_add(len) {
                Some(end) if off >= HEADER_LEN as u64 && end <= file_len => Ok((off, end)),
                _ => invalid(format!(
                    "{name} section [{off}, +{len}) lies outside the {file_len}-byte file (truncated?)"
                )),
            }
        };
        let data = section("data", header.data_offset, header.data_len)?;
        let meta = section("metadata", header.metadata_offset, header.metadata_len)?;
        let dir = section("directory", header.directory_offset, header.directory_len)?;
        if header.data_offset % DATA_ALIGN != 0 {
            return invalid(format!(
                "data section offset {} is not a multiple of {DATA_ALIGN}",
                header.data_offset
            ));
        }
        let sections = [("data", data), ("metadata", meta), ("directory", dir)];
        for (i, (a, ra)) in sections.iter().enumerate() {
            for (b, rb) in &sections[i + 1..] {
                if ra.0 < rb.1 && rb.0 < ra.1 {
                    return invalid(format!("{a} and {b} sections overlap"));
                }
            }
        }
        let meta_bytes = &bytes[meta.0 as usize..meta.1 as usize];
        if crc32fast::hash(meta_bytes) != header.metadata_crc32 {
            return invalid("metadata checksum mismatch (file corrupted)");
        }
        let dir_bytes = &bytes[dir.0 as usize..dir.1 as usize];
        if crc32fast::hash(dir_bytes) != header.directory_crc32 {
            return invalid("tensor directory checksum mismatch (file corrupted)");
        }
        let metadata = Metadata::decode(meta_bytes)?;
        let tensors = parse_directory(dir_bytes, header.tensor_count, data)?;
        let mut index = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if index.insert(t.name.clone(), i).is_some() {
                return invalid(format!("tensor {} appears twice", quote(&t.name)));
            }
        }
        Ok(Self {
            bytes,
            header,
            metadata,
            tensors,
            index,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// The decoded metadata, for dropping values once they have been used
    /// (the file itself is never modified).
    pub fn metadata_mut(&mut self) -> &mut Metadata {
        &mut self.metadata
    }

    /// Directory entries in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn file_len(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        let info = &self.tensors[*self.index.get(name)?];
        let bytes = &self.bytes[info.offset as usize..(info.offset + info.len) as usize];
        Some(TensorView { info, bytes })
    }

    /// Like [`NblFile::tensor`], with an error naming the missing tensor.
    pub fn require(&self, name: &str) -> Result<TensorView<'_>, FormatError> {
        self.tensor(name)
            .ok_or_else(|| FormatError::Invalid(format!("missing tensor {}", quote(name))))
    }

    /// Reads every tensor and compares it with its checksum.
    pub fn verify_checksums(&self) -> Result<(), FormatError> {
        for t in &self.tensors {
            let bytes = &self.bytes[t.offset as usize..(t.offset + t.len) as usize];
            if crc32fast::hash(bytes) != t.crc32 {
                return Err(FormatError::Checksum {
                    tensor: t.name.clone(),
                });
            }
        }
        Ok(())
    }
}

fn parse_directory(
    bytes: &[u8],
    count: u32,
    (data_start, data_end): (u64, u64),
) -> Result<Vec<TensorInfo>, FormatError> {
    // The smallest entry is 2 + 1 + 4 + 1 + 8 + 8 + 8 + 4 bytes; a count
    // beyond what fits is rejected before anything is allocated.
    const MIN_ENTRY: usize = 36;
    if count as usize > bytes.len() / MIN_ENTRY {
        return invalid(format!(
            "directory claims {count} tensors but holds at most {}",
            bytes.len() / MIN_ENTRY
        ));
    }
    let mut c = Cursor::new(bytes, "tensor directory");
    let mut tensors = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let name = c.name()?.to_owned();
        if name.is_empty() {
            return invalid("tensor with an empty name");
        }
        let type_id = c.u32()?;
        let ndim = c.u8()? as usize;
        if ndim == 0 || ndim > MAX_DIMS {
            return invalid(format!(
                "tensor {} has {ndim} dimensions (1 to 4 allowed)",
                quote(&name)
            ));
        }
        let mut shape = Vec::with_capacity(ndim);
        for _ in 0..ndim {
            shape.push(c.u64()?);
        }
        let offset = c.u64()?;
        let len = c.u64()?;
        let crc32 = c.u32()?;
        let bad = |m: String| invalid(format!("tensor {}: {m}", quote(&name)));
        if shape.contains(&0) {
            return bad(format!("shape {shape:?} has a zero dimension"));
        }
        let Some(n) = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)) else {
            return bad(format!("shape {shape:?} overflows"));
        };
        let tensor_type = TensorType::from_id(type_id);
        if let Some(ty) = tensor_type {
            if !shape[ndim - 1].is_multiple_of(ty.cols_multiple() as u64) {
                return bad(format!(
                    "innermost dimension of {shape:?} is not a whole number of blocks"
                ));
            }
            let cols = shape[ndim - 1];
            if ty.byte_len(n / cols, cols) != Some(len) {
                return bad(format!(
                    "length {len} does not match shape {shape:?} of type {ty}"
                ));
            }
        }
        if offset % TENSOR_ALIGN != 0 {
            return bad(format!(
                "offset {offset} is not a multiple of {TENSOR_ALIGN}"
            ));
        }
        match offset.checked_add(len) {
            Some(end) if offset >= data_start && end <= data_end => {}
            _ => {
                return bad(format!(
                    "data [{offset}, +{len}) lies outside the data section (truncated?)"
                ))
            }
        }
        tensors.push(TensorInfo {
            name,
            type_id,
            tensor_type,
            shape,
            offset,
            len,
            crc32,
        });
    }
    if c.remaining() != 0 {
        return invalid("trailing bytes after the tensor directory");
    }
    let mut spans: Vec<(u64, u64, &str)> = tensors
        .iter()
        .map(|t| (t.offset, t.offset + t.len, t.name.as_str()))
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return invalid(format!("tensors '{}' and '{}' overlap", w[0].2, w[1].2));
        }
    }
    Ok(tensors)
}
