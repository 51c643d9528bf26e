//! Model hyper-parameters, read from the container's metadata and checked for
//! consistency before any tensor is looked at.

use crate::error::quote;
use crate::format::{keys, Metadata};

/// How rotary positions are scaled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// HF "linear": positions are divided by `factor`.
    Linear {
        factor: f32,
    },
}

/// The LLaMA hyper-parameters the forward pass needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub rms_norm_eps: f32,
    /// The context length the model was trained for (the default `--ctx`).
    pub context_length: usize,
    pub tie_word_embeddings: bool,
}

/// Larger than any real model's dimension; keeps products of dimensions far
/// from overflow and rejects garbage before it is used to size buffers.
const MAX_DIM: u64 = 1 << 24;

impl Config {
    /// Reads and validates the hyper-parameters. The error is a message
    /// without the file name (the caller adds it).
    pub fn from_metadata(m: &Metadata) -> Result<Self, String> {
        let e = |err: crate::format::FormatError| err.to_string();
        match m.get_str(keys::ARCHITECTURE).map_err(e)? {
            Some("llama") => {}
            Some(other) => {
                return Err(format!(
                    "architecture {} is not supported (only 'llama')",
                    quote(other)
                ))
            }
            None => return Err(format!("metadata '{}' is missing", keys::ARCHITECTURE)),
        }
        let dim = |key: &str| -> Result<Option<usize>, String> {
            match m.get_uint(key).map_err(e)? {
                None => Ok(None),
                Some(0) => Err(format!("metadata '{key}' is 0")),
                Some(v) if v > MAX_DIM => Err(format!("metadata '{key}' = {v} is too large")),
                Some(v) => Ok(Some(v as usize)),
            }
        };
        let need = |key: &str| -> Result<usize, String> {
            dim(key)?.ok_or_else(|| format!("metadata '{key}' is missing"))
        };
        let vocab_size = need(keys::VOCAB_SIZE)?;
        let hidden_size = need(keys::HIDDEN_SIZE)?;
        let num_layers = need(keys::NUM_LAYERS)?;
        let num_heads = need(keys::NUM_HEADS)?;
        let num_kv_heads = dim(keys::NUM_KV_HEADS)?.unwrap_or(num_heads);
        let intermediate_size = need(keys::INTERMEDIATE_SIZE)?;
        let context_length = need(keys::CONTEXT_LENGTH)?;
        let head_dim = match dim(keys::HEAD_DIM)? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(format!(
                    "hidden size {hidden_size} is not divisible by {num_heads} heads"
                ))
            }
        };
        if num_heads % num_kv_heads != 0 {
            return Err(format!(
                "{num_heads} attention heads are not a multiple of {num_kv_heads} key/value heads"
            ));
        }
        if head_dim % 2 != 0 {
            return Err(format!(
                "head dimension {head_dim} is odd (RoPE needs pairs)"
            ));
        }
        let rope_theta = m.get_f32(keys::ROPE_THETA).map_err(e)?.unwrap_or(10000.0);
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(format!("rope theta {rope_theta} is not a positive number"));
        }
        let rope_scaling = match m.get_str(keys::ROPE_SCALING_TYPE).map_err(e)? {
            None | Some("none") => RopeScaling::None,
            Some("linear") => {
                let factor = m
                    .get_f32(keys::ROPE_SCALING_FACTOR)
                    .map_err(e)?
                    .ok_or_else(|| {
                        format!("metadata '{}' is missing", keys::ROPE_SCALING_FACTOR)
                    })?;
                if !(factor.is_finite() && factor > 0.0) {
                    return Err(format!("rope scaling factor {factor} is not positive"));
                }
                RopeScaling::Linear { factor }
            }
            Some(other) => return Err(format!("rope scaling {} is not supported", quote(other))),
        };
        let rms_norm_eps = m.get_f32(keys::RMS_NORM_EPS).map_err(e)?.unwrap_or(1e-5);
        if !(rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
            return Err(format!("rms_norm_eps {rms_norm_eps} is invalid"));
        }
        let tie_word_embeddings = m
            .get_bool(keys::TIE_WORD_EMBEDDINGS)
            .map_err(e)?
            .unwrap_or(false);
        Ok(Self {
            vocab_size,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size,
            rope_theta,
            rope_scaling,
            rms_norm_eps,
            context_length,
            tie_word_embeddings,
        })
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Bytes of the f16 KV cache for `ctx` positions.
    pub fn kv_cache_bytes(&self, ctx: usize) -> usize {
        2 * self.num_layers * ctx * self.kv_dim() * 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Value;

    fn base() -> Metadata {
        let mut m = Metadata::new();
        m.set(keys::ARCHITECTURE, Value::Str("llama".into()));
        for (k, v) in [
            (keys::VOCAB_SIZE, 512),
            (keys::HIDDEN_SIZE, 128),
            (keys::NUM_LAYERS, 2),
            (keys::NUM_HEADS, 8),
            (keys::NUM_KV_HEADS, 2),
            (keys::INTERMEDIATE_SIZE, 352),
            (keys::CONTEXT_LENGTH, 256),
        ] {
            m.set(k, Value::U32(v));
        }
        m
    }

    #[test]
    fn defaults_and_derived_values() {
        let c = Config::from_metadata(&base()).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.kv_dim(), 32);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn inconsistent_heads_are_rejected() {
        let mut m = base();
        m.set(keys::NUM_KV_HEADS, Value::U32(3));
        let err = Config::from_metadata(&m).unwrap_err();
        assert!(err.contains("not a multiple"), "{err}");
        let mut m = base();
        m.set(keys::ARCHITECTURE, Value::Str("gpt2".into()));
        assert!(Config::from_metadata(&m).unwrap_err().contains("gpt2"));
        let mut m = base();
        m.set(keys::HIDDEN_SIZE, Value::U32(0));
        assert!(Config::from_metadata(&m).is_err());
    }

    #[test]
    fn linear_rope_scaling_needs_a_factor() {
        let mut m = base();
        m.set(keys::ROPE_SCALING_TYPE, Value::Str("linear".into()));
        assert!(Config::from_metadata(&m).is_err());
        m.set(keys::ROPE_SCALING_FACTOR, Value::F32(4.0));
        assert_eq!(
            Config::from_metadata(&m).unwrap().rope_scaling,
            RopeScaling::Linear { factor: 4.0 }
        );
    }
}
