//! Feeds arbitrary bytes to the `.nbl` reader. Any panic, overflow or
//! out-of-bounds access is a bug: the reader must turn every input into either
//! a validated file or an error. On success every view the runtime would use
//! is exercised, since validation must make all of them safe.
//!
//! Each input is tried twice: as it is, and with its three CRC-32 fields
//! recomputed. Random mutations almost never keep a checksum valid, so
//! without the second pass the fuzzer would rarely get past the header and
//! would not reach the metadata and directory parsers behind it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nibble::format::NblFile;

fuzz_target!(|data: &[u8]| {
    check(data.to_vec());
    let mut fixed = data.to_vec();
    if fix_crcs(&mut fixed) {
        check(fixed);
    }
});

fn check(bytes: Vec<u8>) {
    let Ok(file) = NblFile::from_bytes(bytes) else {
        return;
    };
    let _ = file.verify_checksums();
    let meta = file.metadata();
    for (key, _) in meta.iter() {
        let _ = meta.get_uint(key);
        let _ = meta.get_f32(key);
        let _ = meta.get_str(key);
        let _ = meta.get_str_array(key);
        let _ = meta.get_u32_array(key);
    }
    for info in file.tensors() {
        let view = file
            .require(&info.name)
            .expect("a listed tensor must be found");
        if let Ok(v) = view.f32s() {
            assert_eq!(v.len() as u64, info.elements());
        }
        if let Ok(m) = view.matrix() {
            assert_eq!((m.rows() * m.cols()) as u64, info.elements());
            let mut row = vec![0f32; m.cols()];
            m.dequantize_row(0, &mut row);
            m.dequantize_row(m.rows() - 1, &mut row);
        }
    }
}

/// Recomputes the metadata, directory and header checksums in place, where
/// the header's section fields point inside the input. False if the input is
/// too short to have a header.
fn fix_crcs(b: &mut [u8]) -> bool {
    if b.len() < 80 {
        return false;
    }
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    for (off, len, crc) in [(32, 40, 64), (48, 56, 68)] {
        let (o, l) = (u64_at(b, off), u64_at(b, len));
        if let Some(end) = o.checked_add(l).filter(|&e| e <= b.len() as u64) {
            let c = crc32fast::hash(&b[o as usize..end as usize]);
            b[crc..crc + 4].copy_from_slice(&c.to_le_bytes());
        }
    }
    let c = crc32fast::hash(&b[..72]);
    b[72..76].copy_from_slice(&c.to_le_bytes());
    true
}
