//! Choosing the next token from logits.
//!
//! Order of operations (as in transformers' logits processors): repetition
//! penalty, then greedy argmax when `temperature <= 0`, else temperature,
//! top-k, softmax, top-p, min-p, and a draw from a seeded PRNG, so the same
//! seed always gives the same tokens.

use crate::error::{Error, Result};

/// Sampling settings; [`SamplerOptions::default`] matches llama.cpp.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerOptions {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = disabled.
    pub top_k: usize,
    /// 1.0 = disabled.
    pub top_p: f32,
    /// 0.0 = disabled: drop tokens less likely than `min_p` times the most
    /// likely one.
    pub min_p: f32,
    /// 1.0 = disabled. A logit of a recently seen token is divided by it when
    /// positive, multiplied when negative (CTRL / transformers convention).
    pub repeat_penalty: f32,
    /// How many of the most recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    /// Seed of the random draws: the same seed, options and logits give the
    /// same tokens.
    pub seed: u64,
}

impl Default for SamplerOptions {
    /// llama.cpp's defaults.
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0x5eed,
        }
    }
}

impl SamplerOptions {
    /// Greedy decoding: always the most likely token (ties: lowest id).
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every option's range (errors start with the field's name).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidArgument(m.into()));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature must be a number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p must be in [0, 1]");
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return bad("repeat_penalty must be a number > 0");
        }
        Ok(())
    }
}

/// PCG32 (O'Neill): small, fast, and the same sequence on every platform.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
    inc: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut r = Self {
            state: 0,
            inc: (0xda3e_39cb_94b9_5bdb << 1) | 1,
        };
        r.next_u32();
        r.state = r.state.wrapping_add(seed);
        r.next_u32();
        r
    }

    pub fn next_u32(&mut self) -> u32 {
        let old = self.state;
        self.state = old.wrapping_mul(6364136223846793005).wrapping_add(self.inc);
        let xorshifted = (((old >> 18) ^ old) >> 27) as u32;
        let rot = (old >> 59) as u32;
        xorshifted.rotate_right(rot)
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
    }
}

/// Picks tokens from logits with the [`SamplerOptions`] it was made with,
/// keeping its random stream across calls.
///
/// ```
/// use nibble::{Sampler, SamplerOptions};
///
/// let logits = [0.5, 3.0, 2.9, -1.0];
/// let mut greedy = Sampler::new(SamplerOptions::greedy())?;
/// assert_eq!(greedy.sample(&mut logits.clone(), &[]), 1);
///
/// // top-k 2: only tokens 1 and 2 can come out; a seed makes it repeatable.
/// let opts = SamplerOptions { temperature: 1.0, top_k: 2, seed: 7, ..Default::default() };
/// let draw = |opts: &SamplerOptions| -> Vec<u32> {
///     let mut s = Sampler::new(opts.clone()).unwrap();
///     (0..20).map(|_| s.sample(&mut logits.clone(), &[])).collect()
/// };
/// let tokens = draw(&opts);
/// assert!(tokens.iter().all(|&t| t == 1 || t == 2));
/// assert_eq!(tokens, draw(&opts));
///
/// // Invalid settings are refused up front.
/// assert!(Sampler::new(SamplerOptions { top_p: 0.0, ..Default::default() }).is_err());
/// # Ok::<(), nibble::Error>(())
/// ```
pub struct Sampler {
    opts: SamplerOptions,
    rng: Rng,
    /// (logit or probability, token id), reused between calls.
    cand: Vec<(f32, u32)>,
}

impl Sampler {
    /// Validates `opts` and seeds the random stream.
    pub fn new(opts: SamplerOptions) -> Result<Self> {
        opts.validate()?;
        Ok(Self {
            rng: Rng::new(opts.seed),
            opts,
            cand: Vec::new(),
        })
    }

    /// The options this sampler was made with.
    pub fn options(&self) -> &SamplerOptions {
        &self.opts
    }

    /// Picks the next token. `logits` is modified by the repetition penalty;
    /// `history` is the sequence so far (prompt and generated tokens).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let o = &self.opts;
        if o.repeat_penalty != 1.0 {
            let recent = &history[history.len().saturating_sub(o.repeat_last_n)..];
            // A token seen twice is penalized once, like transformers.
            for (i, &t) in recent.iter().enumerate() {
                if recent[..i].contains(&t) {
                    continue;
                }
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / o.repeat_penalty
                    } else {
                        *l * o.repeat_penalty
                    };
                }
            }
        }
        if o.temperature <= 0.0 {
            return argmax(logits);
        }
        let cand = &mut self.cand;
        cand.clear();
        let inv_t = 1.0 / o.temperature;
        cand.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (l * inv_t, i as u32)),
        );
        let by_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if o.top_k > 0 && o.top_k < cand.len() {
            cand.select_nth_unstable_by(o.top_k - 1, by_desc);
            cand.truncate(o.top_k);
        }
        cand.sort_unstable_by(by_desc);
        let max = cand[0].0;
        let mut sum = 0f32;
        for c in cand.iter_mut() {
            c.0 = (c.0 - max).exp();
            sum += c.0;
        }
        for c in cand.iter_mut() {
            c.0 /= sum;
        }
        if o.top_p < 1.0 {
            let mut acc = 0f32;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                acc += c.0;
                if acc >= o.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
        }
        if o.min_p > 0.0 {
            let floor = cand[0].0 * o.min_p;
            let keep = cand.iter().take_while(|c| c.0 >= floor).count();
            cand.truncate(keep.max(1));
        }
        let total: f32 = cand.iter().map(|c| c.0).sum();
        let mut r = self.rng.next_f32() * total;
        for c in cand.iter() {
            if r < c.0 {
                return c.1;
            }
            r -= c.0;
        }
        cand[cand.len() - 1].1
    }
}

/// Index of the largest logit; the lowest index among equal maxima (NaN
/// never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_lowest_index_of_ties() {
        let mut s = Sampler::new(SamplerOptions::greedy()).unwrap();
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_distribution_is_respected() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.5).collect();
        let opts = SamplerOptions {
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            temperature: 1.0,
            seed: 42,
            ..SamplerOptions::default()
        };
        let run = |o: SamplerOptions| {
            let mut s = Sampler::new(o).unwrap();
            (0..200)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        let a = run(opts.clone());
        assert_eq!(a, run(opts.clone()));
        assert_ne!(a, run(SamplerOptions { seed: 43, ..opts }));
        // Tokens with the top logit (i % 7 == 6) have ~e^0.5 times the mass of the
        // next ones; they must be drawn most often.
        let top = a.iter().filter(|&&t| t % 7 == 6).count();
        assert!(top > 40, "{top}");
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.1, 2.0, 1.9, -3.0];
        for opts in [
            SamplerOptions {
                top_k: 1,
                ..SamplerOptions::default()
            },
            SamplerOptions {
                top_k: 0,
                top_p: 0.01,
                ..SamplerOptions::default()
            },
            SamplerOptions {
                top_k: 0,
                min_p: 0.99,
                top_p: 1.0,
                ..SamplerOptions::default()
            },
        ] {
            let mut s = Sampler::new(opts).unwrap();
            for _ in 0..20 {
                assert_eq!(s.sample(&mut logits.clone(), &[]), 1);
            }
        }
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplerOptions {
            repeat_penalty: 2.0,
            ..SamplerOptions::greedy()
        })
        .unwrap();
        let mut logits = [0.0, 3.0, 2.0];
        assert_eq!(s.sample(&mut logits, &[1, 1]), 2);
        assert_eq!(logits[1], 1.5);
    }

    #[test]
    fn bad_options_are_errors() {
        for o in [
            SamplerOptions {
                temperature: -1.0,
                ..SamplerOptions::default()
            },
            SamplerOptions {
                top_p: 0.0,
                ..SamplerOptions::default()
            },
            SamplerOptions {
                repeat_penalty: 0.0,
                ..SamplerOptions::default()
            },
        ] {
            assert!(Sampler::new(o).is_err());
        }
    }
}
