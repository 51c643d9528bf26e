//! What a session will allocate, computed before anything is, and how much
//! memory there is to allocate it from.
//!
//! Every buffer whose size a number drives (the context length from the
//! command line or the model's metadata, the rows of logits asked for) is
//! counted here at the full size it can reach, with saturating arithmetic,
//! so an absurd context is refused with the figures instead of aborting the
//! process when the allocator gives up.

use super::session::{KvType, MAX_BATCH, QUERIES_PER_TASK};
use super::Config;
use std::sync::atomic::{AtomicU64, Ordering};

/// The memory a session can grow to, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionMemory {
    /// Keys and values of every position of the context.
    pub kv_cache: u64,
    /// Everything: the KV cache, RoPE tables, attention scores and the
    /// activations of a batch.
    pub total: u64,
}

/// Where the memory a session may use comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryLimit {
    /// `MemAvailable` of `/proc/meminfo`, read when the session is created.
    Available(u64),
    /// A limit the caller set ([`super::SessionOptions::max_memory`] or
    /// [`set_memory_limit`]).
    Limit(u64),
}

impl MemoryLimit {
    pub fn bytes(self) -> u64 {
        match self {
            Self::Available(b) | Self::Limit(b) => b,
        }
    }
}

/// 0 = no process-wide limit.
static LIMIT: AtomicU64 = AtomicU64::new(0);

/// Sets the memory every session created from now on may use (its KV cache
/// and buffers, beyond the mapped model file), unless its options give one.
/// `None` goes back to the memory the OS reports available.
pub fn set_memory_limit(bytes: Option<u64>) {
    LIMIT.store(bytes.map_or(0, |b| b.max(1)), Ordering::Relaxed);
}

/// The limit a session is checked against: `explicit`, else the
/// process-wide one, else `MemAvailable`; `None` when the OS does not say
/// (only overflow is refused then).
pub(crate) fn limit(explicit: Option<u64>) -> Option<MemoryLimit> {
    if let Some(b) = explicit {
        return Some(MemoryLimit::Limit(b));
    }
    match LIMIT.load(Ordering::Relaxed) {
        0 => mem_available().map(MemoryLimit::Available),
        b => Some(MemoryLimit::Limit(b)),
    }
}

/// `MemAvailable` from `/proc/meminfo` (Linux), in bytes.
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// The memory of a session of `ctx` tokens: per position (KV cache, RoPE
/// tables, the widened f16 rows of prefill attention, every thread's
/// attention scores) times `ctx`, plus the activations of a [`MAX_BATCH`]
/// batch and `logits_rows` rows of logits. Saturates instead of overflowing.
pub(crate) fn session_memory(
    c: &Config,
    ctx: usize,
    kv_type: KvType,
    threads: usize,
    logits_rows: usize,
) -> SessionMemory {
    let m = |a: u128, b: u128| a.saturating_mul(b);
    let ctx = ctx as u128;
    let (layers, kvd, hd) = (c.num_layers as u128, c.kv_dim() as u128, c.head_dim as u128);
    let elem: u128 = match kv_type {
        KvType::F16 => 2,
        KvType::F32 => 4,
    };
    let kv_cache = m(m(m(2 * elem, layers), kvd), ctx);
    let group = (c.num_heads / c.num_kv_heads.max(1)).max(1);
    let queries_per_task = ((QUERIES_PER_TASK / group).max(1) * group) as u128;
    let per_position = (hd * 4) // cos and sin
        + if kv_type == KvType::F16 { 2 * hd * 4 } else { 0 }
        + m(threads.max(1) as u128, (1 + queries_per_task) * 4);
    let (h, qd, ffn) = (
        c.hidden_size as u128,
        c.q_dim() as u128,
        c.intermediate_size as u128,
    );
    let batch = m(MAX_BATCH as u128 * 4, 3 * h + 2 * qd + 2 * kvd + 2 * ffn);
    let logits = m(logits_rows.max(1) as u128 * 4, c.vocab_size as u128);
    let total = kv_cache
        .saturating_add(m(per_position, ctx))
        .saturating_add(batch)
        .saturating_add(logits);
    let clamp = |x: u128| u64::try_from(x).unwrap_or(u64::MAX);
    SessionMemory {
        kv_cache: clamp(kv_cache),
        total: clamp(total),
    }
}

/// The longest context whose [`session_memory`] fits in `limit` bytes (0 if
/// none does). The memory grows with `ctx`, so this is a binary search.
pub(crate) fn max_ctx(
    c: &Config,
    kv_type: KvType,
    threads: usize,
    logits_rows: usize,
    limit: u64,
    upto: usize,
) -> usize {
    let fits = |ctx| session_memory(c, ctx, kv_type, threads, logits_rows).total <= limit;
    let (mut lo, mut hi) = (0usize, upto);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// `bytes` for people: "119 GiB", "21.3 GiB", "512.0 MiB".
pub fn human_bytes(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b >= 100.0 * KIB * KIB * KIB {
        format!("{:.0} GiB", b / (KIB * KIB * KIB))
    } else if b >= KIB * KIB * KIB {
        format!("{:.1} GiB", b / (KIB * KIB * KIB))
    } else if b >= KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else if b >= KIB {
        format!("{:.1} KiB", b / KIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// Parses a memory size as the command line gives it: a number of bytes
/// with an optional `K`, `M`, `G` or `T` suffix (powers of 1024, an optional
/// trailing `iB`/`B`), e.g. `512M`, `1.5G`, `8GiB`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t
        .find(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let unit = unit.trim();
    let unit = unit
        .strip_suffix("iB")
        .or_else(|| unit.strip_suffix('B'))
        .unwrap_or(unit);
    let scale: f64 = match unit.to_ascii_uppercase().as_str() {
        "" => 1.0,
        "K" => 1024.0,
        "M" => 1024.0 * 1024.0,
        "G" => 1024.0 * 1024.0 * 1024.0,
        "T" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("'{s}' is not a size (e.g. 512M, 8G)")),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 512M, 8G)"))?;
    let bytes = n * scale;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("'{s}' is not a usable memory size"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_and_sizes_parse() {
        let info = "MemTotal:       32000000 kB\nMemAvailable:   22334000 kB\n";
        assert_eq!(parse_mem_available(info), Some(22334000 * 1024));
        assert_eq!(parse_mem_available("MemFree: 1 kB\n"), None);
        assert_eq!(parse_bytes("1M").unwrap(), 1 << 20);
        assert_eq!(parse_bytes("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_bytes("1.5k").unwrap(), 1536);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("0").is_err());
        assert_eq!(human_bytes(128_000_000_000), "119 GiB");
        assert_eq!(human_bytes(22_870_000_000), "21.3 GiB");
    }
}
