//! LLaMA forward pass (placeholder until the runtime work lands).
