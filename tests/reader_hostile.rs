//! The reader against truncated, corrupted and hostile files. Each hostile
//! file is a valid vector (`format-spec/vectors/mixed.nbl`) with bytes
//! patched and, where the test is not about checksums, its CRCs recomputed,
//! so that the check under test is the one that fires. Every case must give
//! an error (never a panic), or open where SPEC.md says it must.

#[allow(dead_code)]
#[path = "../examples/make_vectors.rs"]
mod make_vectors;

use make_vectors::{at, fix_crcs, raw_directory, raw_metadata, u64_at, RawEntry, RawMeta};
use nibble::format::{FormatError, Metadata, NblFile, NblWriter, Value};
use std::path::Path;

fn base() -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("format-spec/vectors/mixed.nbl"))
        .unwrap()
}

/// The base file with `patch` applied and all checksums made valid again.
fn patched(patch: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut b = base();
    patch(&mut b);
    fix_crcs(&mut b);
    b
}

// Writers of one field, its position found in the bytes being patched.
fn set_u8(b: &mut [u8], pos: impl FnOnce(&[u8]) -> usize, v: u8) {
    let p = pos(b);
    b[p] = v;
}

fn set_u32(b: &mut [u8], pos: impl FnOnce(&[u8]) -> usize, v: u32) {
    let p = pos(b);
    b[p..p + 4].copy_from_slice(&v.to_le_bytes());
}

fn set_u64(b: &mut [u8], pos: impl FnOnce(&[u8]) -> usize, v: u64) {
    let p = pos(b);
    b[p..p + 8].copy_from_slice(&v.to_le_bytes());
}

fn entry(b: &[u8], name: &str) -> RawEntry {
    raw_directory(b)
        .unwrap()
        .into_iter()
        .find(|e| e.name == name)
        .unwrap()
}

fn meta(b: &[u8], key: &str) -> RawMeta {
    raw_metadata(b)
        .unwrap()
        .into_iter()
        .find(|e| e.key == key)
        .unwrap()
}

/// The error the reader gives for `bytes`; fails the test if it accepts them.
fn error_of(bytes: Vec<u8>) -> FormatError {
    match NblFile::from_bytes(bytes) {
        Ok(_) => panic!("hostile file was accepted"),
        Err(e) => e,
    }
}

#[track_caller]
fn assert_invalid(bytes: Vec<u8>, needle: &str) {
    let e = error_of(bytes);
    assert!(matches!(e, FormatError::Invalid(_)), "{e}");
    assert!(
        e.to_string().contains(needle),
        "expected '{needle}' in: {e}"
    );
}

#[track_caller]
fn assert_unsupported(bytes: Vec<u8>, needle: &str) {
    let e = error_of(bytes);
    assert!(matches!(e, FormatError::Unsupported(_)), "{e}");
    assert!(
        e.to_string().contains(needle),
        "expected '{needle}' in: {e}"
    );
}

#[test]
fn base_file_is_valid() {
    let f = NblFile::from_bytes(base()).unwrap();
    f.verify_checksums().unwrap();
    assert_eq!(f.tensors().len(), 6);
    // fix_crcs on an unpatched file changes nothing.
    assert_eq!(patched(|_| {}), base());
}

#[test]
fn every_truncation_is_an_error() {
    let full = base();
    for len in 0..full.len() {
        let e = error_of(full[..len].to_vec());
        let msg = e.to_string();
        if len < 80 {
            assert!(
                msg.contains("shorter than the 80-byte header"),
                "{len}: {msg}"
            );
        } else {
            assert!(msg.contains("truncated"), "{len}: {msg}");
        }
    }
}

#[test]
fn every_bit_flip_in_the_header_is_an_error() {
    let full = base();
    for byte in 0..80 {
        for bit in 0..8 {
            let mut b = full.clone();
            b[byte] ^= 1 << bit;
            // Any error will do; which one depends on the field.
            error_of(b);
        }
    }
}

#[test]
fn every_corrupted_metadata_or_directory_byte_is_an_error() {
    let full = base();
    for (off, len) in [
        (at::METADATA_OFFSET, at::METADATA_LEN),
        (at::DIRECTORY_OFFSET, at::DIRECTORY_LEN),
    ] {
        let start = u64_at(&full, off) as usize;
        let end = start + u64_at(&full, len) as usize;
        for pos in start..end {
            for bit in [0, 3, 7] {
                let mut b = full.clone();
                b[pos] ^= 1 << bit;
                assert_invalid(b, "checksum mismatch");
            }
        }
    }
}

#[test]
fn corrupted_tensor_data_fails_verification_naming_the_tensor() {
    let mut b = base();
    let e = entry(&b, "t.q8");
    b[e.offset as usize + 5] ^= 0x10;
    // Tensor data is checked on request, not at open.
    let f = NblFile::from_bytes(b).unwrap();
    let err = f.verify_checksums().unwrap_err();
    assert!(
        matches!(&err, FormatError::Checksum { tensor } if tensor == "t.q8"),
        "{err}"
    );
}

#[test]
fn bad_magic_and_versions() {
    assert_invalid(patched(|b| b[0] = b'X'), "bad magic");
    assert_unsupported(patched(|b| b[at::VERSION_MAJOR] = 2), "format version 2.1");
    assert_unsupported(patched(|b| b[at::VERSION_MAJOR] = 0), "format version 0.1");
    // A later minor version opens and reads normally.
    let f = NblFile::from_bytes(patched(|b| b[at::VERSION_MINOR] = 9)).unwrap();
    assert_eq!(f.header().version_minor, 9);
    f.verify_checksums().unwrap();
}

#[test]
fn required_flags_are_rejected_optional_flags_ignored() {
    for flag in [1u32, 0x8000, 0x0001_0001] {
        assert_unsupported(
            patched(|b| set_u32(b, |_| at::FLAGS, flag)),
            "required feature flags",
        );
    }
    for flag in [0x0001_0000u32, 0x8000_0000, 0xffff_0000] {
        let f = NblFile::from_bytes(patched(|b| set_u32(b, |_| at::FLAGS, flag))).unwrap();
        assert_eq!(f.header().flags, flag);
    }
}

#[test]
fn reserved_header_bytes_must_be_zero() {
    assert_invalid(patched(|b| b[78] = 1), "reserved header bytes");
}

#[test]
fn hostile_counts() {
    // More tensors than the directory can hold: refused before allocating.
    for count in [9u32, 1000, u32::MAX] {
        assert_invalid(
            patched(|b| set_u32(b, |_| at::TENSOR_COUNT, count)),
            "directory claims",
        );
    }
    // One more than present, but within what 290 bytes could hold.
    assert_invalid(
        patched(|b| set_u32(b, |_| at::TENSOR_COUNT, 7)),
        "tensor directory truncated",
    );
    // Fewer tensors than entries: the rest are trailing bytes.
    assert_invalid(
        patched(|b| set_u32(b, |_| at::TENSOR_COUNT, 5)),
        "trailing bytes after the tensor directory",
    );
    // A metadata count far beyond the entries present.
    assert_invalid(
        patched(|b| {
            let start = u64_at(b, at::METADATA_OFFSET) as usize;
            set_u32(b, |_| start, u32::MAX);
        }),
        "truncated",
    );
    assert_invalid(
        patched(|b| {
            let start = u64_at(b, at::METADATA_OFFSET) as usize;
            set_u32(b, |_| start, 3);
        }),
        "trailing bytes after the metadata",
    );
}

#[test]
fn hostile_metadata_lengths() {
    // u32 array claiming 2^61 elements, string array claiming 2^64-1 strings,
    // a string longer than the value, a value longer than the section.
    let eos = "tokenizer.eos_token_ids";
    assert_invalid(
        patched(|b| set_u64(b, |b| meta(b, eos).value.start, 1 << 61)),
        "array length does not match",
    );
    assert_invalid(
        patched(|b| set_u64(b, |b| meta(b, eos).value.start, u64::MAX)),
        "array length does not match",
    );
    let files = "provenance.source_files";
    assert_invalid(
        patched(|b| set_u64(b, |b| meta(b, files).value.start, u64::MAX)),
        "string array count exceeds",
    );
    assert_invalid(
        patched(|b| set_u64(b, |b| meta(b, files).value.start + 8, u64::MAX / 2)),
        "string runs past the value",
    );
    assert_invalid(
        patched(|b| set_u64(b, |b| meta(b, files).value.start, 2)),
        "trailing bytes after string array",
    );
    for len in [u64::MAX, 1 << 40, 100_000] {
        assert_invalid(
            patched(|b| set_u64(b, |b| meta(b, "llama.vocab_size").len_pos, len)),
            "runs past the section",
        );
    }
    // A fixed-size type with the wrong length.
    assert_invalid(
        patched(|b| set_u8(b, |b| meta(b, "llama.vocab_size").type_pos, 1)),
        "expected 8 bytes, found 4",
    );
    // A key longer than 1024 bytes.
    assert_invalid(
        patched(|b| {
            let e = meta(b, "llama.vocab_size");
            let key_len_pos = e.type_pos - e.key.len() - 2;
            b[key_len_pos..key_len_pos + 2].copy_from_slice(&2000u16.to_le_bytes());
        }),
        "name of 2000 bytes is too long",
    );
}

#[test]
fn malformed_metadata_values() {
    assert_invalid(
        patched(|b| set_u8(b, |b| meta(b, "llama.tie_word_embeddings").value.start, 2)),
        "bool byte is 2",
    );
    assert_invalid(
        patched(|b| set_u8(b, |b| meta(b, "general.architecture").value.start, 0xff)),
        "not UTF-8",
    );
    assert_invalid(
        patched(|b| {
            let e = meta(b, "general.architecture");
            b[e.type_pos - 1] = 0xff;
        }),
        "name is not UTF-8",
    );
}

#[test]
fn duplicate_keys_and_names() {
    // "tokenizer.bos_token" renamed to "tokenizer.eos_token".
    let rename = |b: &mut Vec<u8>| {
        let e = meta(b, "tokenizer.bos_token");
        b[e.type_pos - 9] = b'e';
    };
    assert_invalid(patched(rename), "appears twice");
    // Also when one of the two has a type this reader does not know.
    assert_invalid(
        patched(|b| {
            rename(b);
            set_u8(b, |b| meta(b, "tokenizer.eos_token").type_pos, 99);
        }),
        "appears twice",
    );
    // Tensor "t.q4" renamed to "t.q8".
    assert_invalid(
        patched(|b| {
            let e = entry(b, "t.q4");
            b[e.type_pos - 1] = b'8';
        }),
        "tensor 't.q8' appears twice",
    );
}

#[test]
fn sections_outside_the_file_or_overlapping() {
    let len = base().len() as u64;
    for (off, field) in [
        (at::DATA_OFFSET, at::DATA_LEN),
        (at::METADATA_OFFSET, at::METADATA_LEN),
        (at::DIRECTORY_OFFSET, at::DIRECTORY_LEN),
    ] {
        assert_invalid(patched(|b| set_u64(b, |_| off, len)), "lies outside");
        assert_invalid(
            patched(|b| set_u64(b, |_| off, u64::MAX - 3)),
            "lies outside",
        );
        assert_invalid(patched(|b| set_u64(b, |_| field, u64::MAX)), "lies outside");
        assert_invalid(patched(|b| set_u64(b, |_| off, 40)), "lies outside");
    }
    assert_invalid(
        patched(|b| set_u64(b, |_| at::DATA_OFFSET, 4032)),
        "not a multiple of 4096",
    );
    assert_invalid(
        patched(|b| {
            let m = u64_at(b, at::METADATA_OFFSET);
            set_u64(b, |_| at::DIRECTORY_OFFSET, m);
        }),
        "metadata and directory sections overlap",
    );
    assert_invalid(
        patched(|b| set_u64(b, |_| at::METADATA_OFFSET, 4100)),
        "data and metadata sections overlap",
    );
}

#[test]
fn tensors_outside_the_data_section() {
    let data_end = u64_at(&base(), at::DATA_OFFSET) + u64_at(&base(), at::DATA_LEN);
    let past = data_end.next_multiple_of(64);
    for offset in [past, past + 64, 0, 64, u64::MAX - 63] {
        assert_invalid(
            patched(|b| set_u64(b, |b| entry(b, "t.f16").offset_pos, offset)),
            "outside the data section",
        );
    }
    // The last tensor reaching past the data section by a few bytes.
    assert_invalid(
        patched(|b| {
            let shorter = u64_at(b, at::DATA_LEN) - 4;
            set_u64(b, |_| at::DATA_LEN, shorter);
        }),
        "outside the data section",
    );
}

#[test]
fn misaligned_and_overlapping_tensors() {
    assert_invalid(
        patched(|b| {
            let e = entry(b, "t.q8");
            set_u64(b, |_| e.offset_pos, e.offset + 4);
        }),
        "not a multiple of 64",
    );
    assert_invalid(
        patched(|b| {
            let first = entry(b, "model.norm.weight").offset;
            set_u64(b, |b| entry(b, "t.q4").offset_pos, first);
        }),
        "overlap",
    );
    assert_invalid(
        patched(|b| {
            let f16_offset = entry(b, "t.f16").offset;
            set_u64(b, |b| entry(b, "t.q8").offset_pos, f16_offset);
        }),
        "overlap",
    );
}

#[test]
fn shape_and_length_mismatches() {
    // t.q8 is [2, 32], 68 bytes.
    let dim0 = |b: &[u8]| entry(b, "t.q8").ndim_pos + 1;
    let dim1 = |b: &[u8]| entry(b, "t.q8").ndim_pos + 9;
    assert_invalid(
        patched(|b| set_u64(b, |b| dim0(b), 3)),
        "does not match shape",
    );
    assert_invalid(
        patched(|b| {
            set_u64(b, |b| dim0(b), 64);
            set_u64(b, |b| dim1(b), 1);
        }),
        "not a whole number of blocks",
    );
    assert_invalid(patched(|b| set_u64(b, |b| dim0(b), 0)), "zero dimension");
    assert_invalid(
        patched(|b| {
            set_u64(b, |b| dim0(b), u64::MAX / 2);
            set_u64(b, |b| dim1(b), 32);
        }),
        "overflows",
    );
    assert_invalid(
        patched(|b| {
            let e = entry(b, "t.q8");
            set_u64(b, |_| e.len_pos, e.len + 2);
        }),
        "does not match shape",
    );
    for ndim in [0u8, 5, 255] {
        assert_invalid(
            patched(|b| set_u8(b, |b| entry(b, "t.q8").ndim_pos, ndim)),
            "dimensions (1 to 4 allowed)",
        );
    }
    // An empty tensor name.
    assert_invalid(
        patched(|b| {
            // Turn the 1-dimensional f32 tensor's name length to 0: what
            // follows no longer parses as its fields, so any error is fine,
            // but the empty name must be what is reported first.
            let s = entry(b, "model.norm.weight").start;
            b[s..s + 2].copy_from_slice(&0u16.to_le_bytes());
        }),
        "empty name",
    );
    // A matrix view of a 1-dimensional tensor is an error, not a panic.
    let f = NblFile::from_bytes(base()).unwrap();
    let e = f
        .require("model.norm.weight")
        .unwrap()
        .matrix()
        .unwrap_err();
    assert!(e.to_string().contains("expected a matrix"), "{e}");
    let e = f.require("t.q8").unwrap().f32s().unwrap_err();
    assert!(e.to_string().contains("expected f32"), "{e}");
    assert!(f.require("no.such.tensor").is_err());
}

#[test]
fn unknown_tensor_type_opens_but_is_unusable() {
    let f = NblFile::from_bytes(patched(|b| {
        let e = entry(b, "t.q4");
        set_u32(b, |_| e.type_pos, 1000);
    }))
    .unwrap();
    let t = f.require("t.q4").unwrap();
    assert_eq!((t.info.type_id, t.info.tensor_type), (1000, None));
    for e in [t.matrix().unwrap_err(), t.f32s().unwrap_err()] {
        assert!(matches!(e, FormatError::Unsupported(_)), "{e}");
        assert!(e.to_string().contains("type id 1000"), "{e}");
    }
    // The other tensors are unaffected, and checksums still cover it.
    f.require("t.q8").unwrap().matrix().unwrap();
    f.verify_checksums().unwrap();
    // Its bounds are still validated.
    assert_invalid(
        patched(|b| {
            let e = entry(b, "t.q4");
            set_u32(b, |_| e.type_pos, 1000);
            set_u64(b, |_| e.len_pos, 1 << 20);
        }),
        "outside the data section",
    );
}

#[test]
fn unknown_metadata_type_is_skipped() {
    let f = NblFile::from_bytes(patched(|b| {
        set_u8(b, |b| meta(b, "llama.rope_theta").type_pos, 77);
    }))
    .unwrap();
    assert!(f.metadata().get("llama.rope_theta").is_none());
    assert_eq!(f.metadata().get_uint("llama.vocab_size").unwrap(), Some(4));
    assert_eq!(f.metadata().len(), 24);
}

#[test]
fn open_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hostile.nbl");
    std::fs::write(
        &path,
        patched(|b| set_u32(b, |_| at::TENSOR_COUNT, u32::MAX)),
    )
    .unwrap();
    let msg = NblFile::open(&path).err().unwrap().to_string();
    assert!(msg.starts_with(&path.display().to_string()), "{msg}");
    assert!(msg.contains("directory claims"), "{msg}");
    assert!(!msg.contains('\n'), "one line: {msg}");
    let missing = dir.path().join("missing.nbl");
    let msg = NblFile::open(&missing).err().unwrap().to_string();
    assert!(msg.contains("missing.nbl"), "{msg}");
}

#[test]
fn writer_refuses_an_overlong_metadata_key_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.nbl");
    let w = NblWriter::create(&path).unwrap();
    let mut m = Metadata::new();
    m.set(&"k".repeat(1025), Value::U32(1));
    let e = w.finish(&m).unwrap_err();
    assert!(e.to_string().contains("longer than 1024"), "{e}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
