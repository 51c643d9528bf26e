//! `nibble bench`: llama-bench's two measurements, prompt processing (one
//! batch of `pp` tokens from an empty cache) and text generation (`tg`
//! single-token steps after `depth` tokens already in the cache), repeated,
//! plus the process's peak resident memory.

use crate::error::{Error, Result};
use crate::model::{Model, Session, SessionOptions};
use crate::sampler::Rng;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Prompt tokens for the pp test (0 = skip).
    pub prompt_tokens: usize,
    /// Generated tokens for the tg test (0 = skip).
    pub gen_tokens: usize,
    /// Tokens already in the cache before the tg test.
    pub depth: usize,
    pub repetitions: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            prompt_tokens: 512,
            gen_tokens: 128,
            depth: 0,
            repetitions: 5,
        }
    }
}

/// Mean and sample standard deviation.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stat {
    pub mean: f64,
    pub stddev: f64,
}

impl Stat {
    pub fn of(xs: &[f64]) -> Self {
        if xs.is_empty() {
            return Self::default();
        }
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = if xs.len() > 1 {
            xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        Self {
            mean,
            stddev: var.sqrt(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct BenchResult {
    /// Tokens per second of prompt processing, over the repetitions.
    pub pp_tps: Option<Stat>,
    /// Tokens per second of generation.
    pub tg_tps: Option<Stat>,
}

/// Runs the benchmark on random token ids (like llama-bench, the content of
/// the tokens does not change the work).
pub fn bench(model: &Model, o: &BenchOptions) -> Result<BenchResult> {
    if o.repetitions == 0 {
        return Err(Error::InvalidArgument("-r must be at least 1".into()));
    }
    // Checked against the memory limit by `Session::new`, before the depth
    // or the prompt is generated.
    let ctx = o
        .prompt_tokens
        .max(o.depth.saturating_add(o.gen_tokens))
        .max(1);
    let mut session = Session::new(model, SessionOptions::with_ctx(ctx))?;
    let vocab = model.config().vocab_size as u32;
    let mut rng = Rng::new(1234);
    let mut random = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.next_u32() % vocab).collect() };

    // Warm-up: page the weights in and start the thread pool.
    session.forward(&random(o.prompt_tokens.clamp(1, 16)))?;

    let mut pp_tps = None;
    if o.prompt_tokens > 0 {
        let mut runs = Vec::with_capacity(o.repetitions);
        for _ in 0..o.repetitions {
            let tokens = random(o.prompt_tokens);
            session.reset();
            let t = Instant::now();
            session.forward(&tokens)?;
            runs.push(o.prompt_tokens as f64 / t.elapsed().as_secs_f64());
        }
        pp_tps = Some(Stat::of(&runs));
    }
    let mut tg_tps = None;
    if o.gen_tokens > 0 {
        let mut runs = Vec::with_capacity(o.repetitions);
        for _ in 0..o.repetitions {
            session.reset();
            if o.depth > 0 {
                session.forward(&random(o.depth))?;
            }
            let tokens = random(o.gen_tokens);
            let t = Instant::now();
            for &tok in &tokens {
                session.forward(&[tok])?;
            }
            runs.push(o.gen_tokens as f64 / t.elapsed().as_secs_f64());
        }
        tg_tps = Some(Stat::of(&runs));
    }
    Ok(BenchResult { pp_tps, tg_tps })
}

/// Peak resident memory of this process (`VmHWM`), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_mean_and_sample_stddev() {
        let s = Stat::of(&[1.0, 2.0, 3.0]);
        assert_eq!(s.mean, 2.0);
        assert!((s.stddev - 1.0).abs() < 1e-12);
    }

    #[test]
    fn peak_rss_is_reported_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().unwrap() > 0);
        }
    }
}
