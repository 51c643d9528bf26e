//! Tensor names inside a `.nbl` file. They are HuggingFace's LLaMA names, so a
//! tensor can be traced back to the checkpoint it came from.

pub const TOKEN_EMBEDDING: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
/// Absent when the model ties its output projection to the token embedding.
pub const OUTPUT: &str = "lm_head.weight";

/// The per-layer tensors, in the order the converter writes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerTensor {
    AttnNorm,
    Q,
    K,
    V,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
}

impl LayerTensor {
    pub const ALL: [LayerTensor; 9] = [
        Self::AttnNorm,
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::FfnNorm,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];

    fn suffix(self) -> &'static str {
        match self {
            Self::AttnNorm => "input_layernorm.weight",
            Self::Q => "self_attn.q_proj.weight",
            Self::K => "self_attn.k_proj.weight",
            Self::V => "self_attn.v_proj.weight",
            Self::O => "self_attn.o_proj.weight",
            Self::FfnNorm => "post_attention_layernorm.weight",
            Self::Gate => "mlp.gate_proj.weight",
            Self::Up => "mlp.up_proj.weight",
            Self::Down => "mlp.down_proj.weight",
        }
    }

    pub fn is_norm(self) -> bool {
        matches!(self, Self::AttnNorm | Self::FfnNorm)
    }

    /// The tensor's name in layer `layer`.
    pub fn name(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}", self.suffix())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_huggingface() {
        assert_eq!(
            LayerTensor::Q.name(3),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            LayerTensor::FfnNorm.name(0),
            "model.layers.0.post_attention_layernorm.weight"
        );
    }
}
