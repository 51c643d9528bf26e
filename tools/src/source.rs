//! The weights of a checkpoint: one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, each memory-mapped. Only headers are parsed
//! up front; tensor bytes are touched when converted and released right after.

use crate::hf::read_json;
use crate::ToolError;
use memmap2::UncheckedAdvice;
use nibble::mapped_file_guard::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Element types the converter reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceDtype {
    F32,
    F16,
    Bf16,
}

impl SourceDtype {
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Bf16 => "BF16",
        }
    }

    /// Decodes little-endian elements into `out` (same count).
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) {
        debug_assert_eq!(bytes.len(), out.len() * self.size());
        match self {
            Self::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
                Ok(src) => out.copy_from_slice(src),
                Err(_) => {
                    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    }
                }
            },
            Self::F16 => {
                use half::slice::HalfFloatSliceExt;
                // The aligned path uses the CPU's F16C conversion when present.
                match bytemuck::try_cast_slice::<u8, half::f16>(bytes) {
                    Ok(src) => src.convert_to_f32_slice(out),
                    Err(_) => {
                        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                            *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                        }
                    }
                }
            }
            Self::Bf16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
                }
            }
        }
    }
}

/// One tensor of the checkpoint.
#[derive(Clone, Debug)]
pub struct SourceTensor {
    pub shard: usize,
    pub dtype: SourceDtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the shard file.
    pub start: usize,
    pub end: usize,
}

struct Shard {
    path: PathBuf,
    map: Mmap,
}

/// The mapped safetensors files of a checkpoint and the tensors in them.
pub struct Source {
    shards: Vec<Shard>,
    tensors: BTreeMap<String, SourceTensor>,
}

/// Buffers the HF LLaMA implementation registers but that are not weights.
fn is_ignored(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

impl Source {
    /// Opens `model.safetensors`, or the shards named by
    /// `model.safetensors.index.json`, in `dir`.
    pub fn open(dir: &Path) -> Result<Self, ToolError> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<String> = if index.exists() {
            let json = read_json(&index)?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ToolError::new(&index, "no 'weight_map' object"))?;
            let mut files = BTreeSet::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    ToolError::new(
                        &index,
                        format!(
                            "tensor {} maps to {}, not a file name",
                            nibble::error::quote(tensor),
                            nibble::error::quote(&file.to_string())
                        ),
                    )
                })?;
                // The index must not send us outside the checkpoint directory.
                if Path::new(file).components().count() != 1 || file == ".." || file == "." {
                    return Err(ToolError::new(
                        &index,
                        format!("{} is not a plain file name", nibble::error::quote(file)),
                    ));
                }
                files.insert(file.to_owned());
            }
            if files.is_empty() {
                return Err(ToolError::new(&index, "the weight map is empty"));
            }
            files.into_iter().collect()
        } else if single.exists() {
            vec!["model.safetensors".into()]
        } else {
            return Err(ToolError::new(
                dir,
                "no model.safetensors or model.safetensors.index.json",
            ));
        };

        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = BTreeMap::new();
        for (i, name) in files.iter().enumerate() {
            let path = dir.join(name);
            let file = nibble::fsutil::open_regular_for_read(&path)
                .map_err(|e| crate::open_error(&path, e))?;
            // SAFETY: a read-only private mapping. Rust's aliasing rules would
            // be broken only if another process modified the file while we
            // read it; a checkpoint being converted is an input nobody should
            // be writing, and the worst outcome then is converting whatever
            // bytes were there (every header-derived range is validated below,
            // and a truncation is reported by the header check).
            let map = unsafe { Mmap::map(&file, &path) }
                .map_err(|e| ToolError::new(&path, format!("cannot map: {e}")))?;
            let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
                let problem = bad_tensor_entry(&map)
                    .unwrap_or_else(|| format!("invalid safetensors file: {}", describe(&e)));
                ToolError::new(&path, problem)
            })?;
            let data_start = 8 + header_len;
            for (tname, info) in meta.tensors() {
                if is_ignored(&tname) {
                    continue;
                }
                let dtype = match info.dtype {
                    Dtype::F32 => SourceDtype::F32,
                    Dtype::F16 => SourceDtype::F16,
                    Dtype::BF16 => SourceDtype::Bf16,
                    other => {
                        return Err(ToolError::new(
                            &path,
                            format!(
                            "tensor {} has dtype {other:?}; only F32, F16 and BF16 are supported",
                            nibble::error::quote(&tname)
                        ),
                        ))
                    }
                };
                let t = SourceTensor {
                    shard: i,
                    dtype,
                    shape: info.shape.clone(),
                    start: data_start + info.data_offsets.0,
                    end: data_start + info.data_offsets.1,
                };
                if tensors.insert(tname.clone(), t).is_some() {
                    return Err(ToolError::new(
                        &path,
                        format!(
                            "tensor {} also appears in another shard",
                            nibble::error::quote(&tname)
                        ),
                    ));
                }
            }
            shards.push(Shard { path, map });
        }
        if index.exists() {
            let json = read_json(&index)?;
            if let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) {
                for (tensor, file) in map {
                    if is_ignored(tensor) {
                        continue;
                    }
                    let where_ = tensors.get(tensor).map(|t| &files[t.shard]);
                    if where_.map(String::as_str) != file.as_str() {
                        return Err(ToolError::new(
                            &index,
                            format!(
                                "tensor {} is not in {} as the index says",
                                nibble::error::quote(tensor),
                                nibble::error::quote(&file.to_string())
                            ),
                        ));
                    }
                }
            }
        }
        Ok(Self { shards, tensors })
    }

    pub fn tensors(&self) -> &BTreeMap<String, SourceTensor> {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&SourceTensor> {
        self.tensors.get(name)
    }

    /// The file a tensor lives in.
    pub fn path(&self, t: &SourceTensor) -> &Path {
        &self.shards[t.shard].path
    }

    /// The shard file names, in order.
    pub fn file_names(&self) -> Vec<String> {
        self.shards
            .iter()
            .map(|s| {
                s.path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }

    /// The bytes of `t`.
    pub fn bytes(&self, t: &SourceTensor) -> &[u8] {
        &self.shards[t.shard].map[t.start..t.end]
    }

    /// Tells the kernel the process is done with these bytes of `t` so their
    /// pages stop counting toward resident memory. Purely an optimization:
    /// failures are ignored.
    pub fn release(&self, t: &SourceTensor, from: usize, to: usize) {
        let map = &self.shards[t.shard].map;
        let (start, end) = (t.start + from, (t.start + to).min(t.end));
        if end <= start {
            return;
        }
        // SAFETY: MADV_DONTNEED on a read-only, private, file-backed mapping
        // only drops the process's page-table entries; the next access faults
        // the same bytes back in from the (unmodified) file, so every live
        // borrow of the map keeps seeing identical contents. No copy-on-write
        // data exists to lose because the mapping is never written.
        let _ =
            unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start) };
    }

    /// Maps bytes `[from, to)` of `t` into the process in one system call
    /// instead of one page fault per few pages. Purely an optimization.
    pub fn populate(&self, t: &SourceTensor, from: usize, to: usize) {
        let map = &self.shards[t.shard].map;
        let (start, end) = (t.start + from, (t.start + to).min(t.end));
        if end > start {
            let _ = map.advise_range(memmap2::Advice::PopulateRead, start, end - start);
        }
    }

    /// Hints that `t` is about to be read front to back.
    pub fn will_read(&self, t: &SourceTensor) {
        let map = &self.shards[t.shard].map;
        let _ = map.advise_range(memmap2::Advice::Sequential, t.start, t.end - t.start);
    }
}

/// safetensors' error variants, in words a user can act on.
/// When the safetensors crate refuses a header, the tensor entry at fault
/// (whose dtype this version of the format does not know, or that has none),
/// so the message can name it.
fn bad_tensor_entry(map: &[u8]) -> Option<String> {
    use nibble::error::quote;
    let n = usize::try_from(u64::from_le_bytes(map.get(..8)?.try_into().ok()?)).ok()?;
    let header: serde_json::Value =
        serde_json::from_slice(map.get(8..8usize.checked_add(n)?)?).ok()?;
    for (name, entry) in header.as_object()? {
        if name == "__metadata__" {
            continue;
        }
        match entry.get("dtype") {
            None => return Some(format!("tensor {} has no dtype", quote(name))),
            Some(d) if serde_json::from_value::<Dtype>(d.clone()).is_err() => {
                let text = d.as_str().map_or_else(|| d.to_string(), str::to_owned);
                return Some(format!(
                    "tensor {} has unknown dtype {}; only F32, F16 and BF16 are supported",
                    quote(name),
                    quote(&text)
                ));
            }
            Some(_) => {}
        }
    }
    None
}

fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "file is shorter than the 8-byte header length (truncated?)".into(),
        E::InvalidHeaderLength => {
            "header length points past the end of the file (truncated?)".into()
        }
        E::MetadataIncompleteBuffer => {
            "tensor data does not end where the file ends (truncated or padded)".into()
        }
        E::InvalidHeader(_) => "header is not UTF-8 (corrupt header)".into(),
        E::InvalidHeaderDeserialization(j) => {
            format!("header is not valid JSON (corrupt header): {j}")
        }
        E::HeaderTooLarge => "header length is absurdly large (corrupt header)".into(),
        other => format!("{other}"),
    }
}
