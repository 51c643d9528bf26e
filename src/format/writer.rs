//! Streaming writer: tensors go to disk one at a time, so writing a model
//! needs memory for one tensor, not the model. Output goes to a temporary file
//! beside the target ([`crate::fsutil::AtomicFile`]) that is renamed into
//! place only by [`NblWriter::finish`]; dropping an unfinished writer deletes
//! it, so no half-written `.nbl` is ever left under the target name. A target
//! that exists and is not a regular file (a device node, FIFO, directory) is
//! refused, and temporaries of the target left by killed processes are
//! removed when the next writer of it is created.

use super::{
    align_up, put_name, FormatError, Header, Metadata, DATA_ALIGN, HEADER_LEN, MAX_DIMS,
    MAX_NAME_LEN, TENSOR_ALIGN, VERSION_MAJOR, VERSION_MINOR,
};
use crate::error::quote;
use crate::fsutil::AtomicFile;
use crate::quant::TensorType;
use std::collections::HashSet;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

struct Entry {
    name: String,
    ty: TensorType,
    shape: Vec<u64>,
    offset: u64,
    len: u64,
    crc32: u32,
}

/// Writes a `.nbl` file tensor by tensor.
///
/// ```
/// use nibble::format::{keys, Metadata, NblFile, NblWriter, Value};
/// use nibble::quant::TensorType;
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("two.nbl");
/// let mut w = NblWriter::create(&path)?;
/// let values: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
/// w.add_tensor("norm.weight", TensorType::F32, &[2], &values)?;
/// let mut meta = Metadata::new();
/// meta.set(keys::ARCHITECTURE, Value::Str("llama".into()));
/// w.finish(&meta)?;
///
/// let file = NblFile::open(&path)?; // validates, then reads in place
/// file.verify_checksums()?;
/// assert_eq!(file.require("norm.weight")?.f32s()?, &[1.5, -2.0]);
/// assert_eq!(file.metadata().get_str(keys::ARCHITECTURE)?, Some("llama"));
/// // Nothing but the finished file is left in the directory.
/// assert_eq!(std::fs::read_dir(dir.path())?.count(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct NblWriter {
    file: Option<BufWriter<AtomicFile>>,
    pos: u64,
    entries: Vec<Entry>,
    names: HashSet<String>,
}

impl NblWriter {
    /// Where this process writes `path` until [`NblWriter::finish`] renames
    /// it: `.NAME.tmpPID` next to it, so the rename stays on one file system
    /// (`None` when `path` has no file name). A signal handler removes it
    /// with [`crate::fsutil::remove_unfinished`].
    pub fn temp_path(path: &Path) -> Option<PathBuf> {
        crate::fsutil::temp_path(path)
    }

    /// Starts a new file that will appear at `path` when finished. Refuses a
    /// `path` that exists and is not a regular file.
    pub fn create(path: &Path) -> Result<Self, FormatError> {
        let file = AtomicFile::create(path).map_err(|e| {
            FormatError::Io(std::io::Error::new(
                e.kind(),
                format!("cannot write {}: {e}", path.display()),
            ))
        })?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.write_all(&vec![0u8; DATA_ALIGN as usize])?;
        Ok(Self {
            file: Some(w),
            pos: DATA_ALIGN,
            entries: Vec::new(),
            names: HashSet::new(),
        })
    }

    fn out(&mut self) -> &mut BufWriter<AtomicFile> {
        self.file.as_mut().expect("writer used after finish")
    }

    /// Appends one tensor whose `data` is already in the on-disk layout of
    /// `ty` (see [`crate::quant`]). `shape` is outermost first: `[rows, cols]`.
    pub fn add_tensor(
        &mut self,
        name: &str,
        ty: TensorType,
        shape: &[u64],
        data: &[u8],
    ) -> Result<(), FormatError> {
        let bad = |m: String| Err(FormatError::Invalid(format!("tensor {}: {m}", quote(name))));
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return bad("name must be 1 to 1024 bytes".into());
        }
        if shape.is_empty() || shape.len() > MAX_DIMS || shape.contains(&0) {
            return bad(format!(
                "shape {shape:?} must have 1 to 4 non-zero dimensions"
            ));
        }
        if !shape[shape.len() - 1].is_multiple_of(ty.cols_multiple() as u64) {
            return bad(format!(
                "innermost dimension of {shape:?} is not a whole number of blocks"
            ));
        }
        let n = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let cols = shape[shape.len() - 1];
        let expected = n.and_then(|n| ty.byte_len(n / cols, cols));
        if expected != Some(data.len() as u64) {
            return bad(format!(
                "{} bytes of data do not fit shape {shape:?} of type {ty}",
                data.len()
            ));
        }
        if !self.names.insert(name.to_owned()) {
            return bad("written twice".into());
        }
        let offset = align_up(self.pos, TENSOR_ALIGN);
        let pad = (offset - self.pos) as usize;
        let out = self.out();
        out.write_all(&[0u8; TENSOR_ALIGN as usize][..pad])?;
        out.write_all(data)?;
        self.pos = offset + data.len() as u64;
        self.entries.push(Entry {
            name: name.to_owned(),
            ty,
            shape: shape.to_vec(),
            offset,
            len: data.len() as u64,
            crc32: crc32fast::hash(data),
        });
        Ok(())
    }

    /// Writes metadata, directory and header, flushes to disk and moves the
    /// file to its final name.
    pub fn finish(mut self, metadata: &Metadata) -> Result<u64, FormatError> {
        if let Some((key, _)) = metadata.iter().find(|(k, _)| k.len() > MAX_NAME_LEN) {
            return Err(FormatError::Invalid(format!(
                "metadata key of {} bytes is longer than {MAX_NAME_LEN}: {}...",
                key.len(),
                &key[..key.floor_char_boundary(40)]
            )));
        }
        let data_len = self.pos - DATA_ALIGN;
        let meta = metadata.encode();
        let mut dir = Vec::new();
        for e in &self.entries {
            put_name(&mut dir, &e.name);
            dir.extend_from_slice(&e.ty.id().to_le_bytes());
            dir.push(e.shape.len() as u8);
            for d in &e.shape {
                dir.extend_from_slice(&d.to_le_bytes());
            }
            dir.extend_from_slice(&e.offset.to_le_bytes());
            dir.extend_from_slice(&e.len.to_le_bytes());
            dir.extend_from_slice(&e.crc32.to_le_bytes());
        }
        let header = Header {
            version_major: VERSION_MAJOR,
            version_minor: VERSION_MINOR,
            flags: 0,
            tensor_count: u32::try_from(self.entries.len())
                .map_err(|_| FormatError::Invalid("too many tensors".into()))?,
            data_offset: DATA_ALIGN,
            data_len,
            metadata_offset: self.pos,
            metadata_len: meta.len() as u64,
            directory_offset: self.pos + meta.len() as u64,
            directory_len: dir.len() as u64,
            metadata_crc32: crc32fast::hash(&meta),
            directory_crc32: crc32fast::hash(&dir),
        };
        let total = header.directory_offset + header.directory_len;
        let mut out = self.file.take().expect("writer used after finish");
        out.write_all(&meta)?;
        out.write_all(&dir)?;
        out.seek(SeekFrom::Start(0))?;
        out.write_all(&header.encode()[..HEADER_LEN])?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        let target = file.target().to_owned();
        file.commit().map_err(|e| {
            FormatError::Io(std::io::Error::new(
                e.kind(),
                format!("cannot move output into {}: {e}", target.display()),
            ))
        })?;
        Ok(total)
    }
}
