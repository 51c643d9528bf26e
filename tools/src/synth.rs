//! Deterministic random HuggingFace checkpoints with official LLaMA-2 shapes,
//! so conversion time and memory of 7B/13B/70B models can be measured without
//! downloading real weights.
//!
//! Weights are approximately normal with std 0.02 (norms around 1), generated
//! from a counter-based hash of (seed, tensor, position): the bytes do not
//! depend on the number of threads. Files are streamed in batches, never
//! holding a model (or even a whole tensor) in memory.

use crate::ToolError;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use nibble::format::names::{self, LayerTensor};
use nibble::fsutil::AtomicFile;
use rayon::prelude::*;
use serde_json::{json, Map, Value};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    Llama2_7b,
    Llama2_13b,
    Llama2_70b,
    /// A few-MB model for tests.
    Tiny,
    /// A small model whose matrix widths are multiples of 256, so every q4k
    /// row is whole 256-weight groups.
    Tiny256,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthDtype {
    F16,
    Bf16,
}

/// The shapes of a preset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shapes {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub context: usize,
}

impl Preset {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "llama2-7b" => Some(Self::Llama2_7b),
            "llama2-13b" => Some(Self::Llama2_13b),
            "llama2-70b" => Some(Self::Llama2_70b),
            "tiny" => Some(Self::Tiny),
            "tiny-256" => Some(Self::Tiny256),
            _ => None,
        }
    }

    /// The official LLaMA-2 configurations (Touvron et al. 2023, HF configs).
    pub fn shapes(self) -> Shapes {
        let (hidden, layers, heads, kv_heads, ffn, vocab, context) = match self {
            Self::Llama2_7b => (4096, 32, 32, 32, 11008, 32000, 4096),
            Self::Llama2_13b => (5120, 40, 40, 40, 13824, 32000, 4096),
            Self::Llama2_70b => (8192, 80, 64, 8, 28672, 32000, 4096),
            Self::Tiny => (64, 2, 4, 2, 160, 320, 256),
            Self::Tiny256 => (256, 2, 4, 2, 512, 320, 256),
        };
        Shapes {
            hidden,
            layers,
            heads,
            kv_heads,
            ffn,
            vocab,
            context,
        }
    }
}

impl SynthDtype {
    fn safetensors_name(self) -> &'static str {
        match self {
            Self::F16 => "F16",
            Self::Bf16 => "BF16",
        }
    }

    fn torch_name(self) -> &'static str {
        match self {
            Self::F16 => "float16",
            Self::Bf16 => "bfloat16",
        }
    }
}

#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub preset: Preset,
    pub output: PathBuf,
    pub dtype: SynthDtype,
    pub seed: u64,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Largest shard in bytes; a checkpoint that fits in one is written as a
    /// single `model.safetensors`.
    pub max_shard_bytes: u64,
}

impl SynthOptions {
    pub fn new(preset: Preset, output: impl Into<PathBuf>, dtype: SynthDtype) -> Self {
        Self {
            preset,
            output: output.into(),
            dtype,
            seed: 0x6e69_6262_6c65,
            progress: false,
            max_shard_bytes: 2 << 30,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct SynthSummary {
    pub tensors: usize,
    pub parameters: u64,
    pub shards: usize,
    pub bytes: u64,
    pub seconds: f64,
}

struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    norm: bool,
}

impl TensorSpec {
    fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

fn tensor_specs(s: &Shapes) -> Vec<TensorSpec> {
    let head_dim = s.hidden / s.heads;
    let kv = s.kv_heads * head_dim;
    let mut v = vec![TensorSpec {
        name: names::TOKEN_EMBEDDING.into(),
        shape: vec![s.vocab, s.hidden],
        norm: false,
    }];
    for l in 0..s.layers {
        for t in LayerTensor::ALL {
            let shape = match t {
                LayerTensor::AttnNorm | LayerTensor::FfnNorm => vec![s.hidden],
                LayerTensor::Q | LayerTensor::O => vec![s.hidden, s.hidden],
                LayerTensor::K | LayerTensor::V => vec![kv, s.hidden],
                LayerTensor::Gate | LayerTensor::Up => vec![s.ffn, s.hidden],
                LayerTensor::Down => vec![s.hidden, s.ffn],
            };
            v.push(TensorSpec {
                name: t.name(l),
                shape,
                norm: t.is_norm(),
            });
        }
    }
    v.push(TensorSpec {
        name: names::FINAL_NORM.into(),
        shape: vec![s.hidden],
        norm: true,
    });
    v.push(TensorSpec {
        name: names::OUTPUT.into(),
        shape: vec![s.vocab, s.hidden],
        norm: false,
    });
    v
}

/// SplitMix64's finalizer: a good 64-bit mix of a counter.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// An approximately standard normal value from 64 random bits: the sum of
/// four 16-bit uniforms (Irwin–Hall), centred and scaled to unit variance.
fn normalish(bits: u64) -> f32 {
    let s = (bits & 0xffff) + ((bits >> 16) & 0xffff) + ((bits >> 32) & 0xffff) + (bits >> 48);
    // Four uniforms on [0, 65536): mean 131070, variance 4 * 65536² / 12.
    (s as f32 - 131_070.0) * (1.0 / 37_837.23)
}

/// Fills `out` with the values at positions `start..` of tensor `tensor_id`.
fn fill(seed: u64, tensor_id: u64, start: u64, norm: bool, out: &mut [f32]) {
    let key = mix(seed ^ mix(tensor_id));
    for (i, o) in out.iter_mut().enumerate() {
        let z = normalish(mix(key ^ (start + i as u64)));
        *o = if norm { 1.0 + 0.1 * z } else { 0.02 * z };
    }
}

/// Elements generated per parallel task.
const TASK_ELEMS: usize = 1 << 16;
/// Elements per sequential write batch.
const BATCH_ELEMS: usize = 1 << 24;

/// Writes a HuggingFace checkpoint for `options.preset` into `options.output`.
pub fn synth(options: &SynthOptions) -> Result<SynthSummary, ToolError> {
    let started = std::time::Instant::now();
    let dir = &options.output;
    nibble::fsutil::check_output_dir(dir, &[]).map_err(|e| ToolError::new(dir, e))?;
    std::fs::create_dir_all(dir)
        .map_err(|e| ToolError::new(dir, format!("cannot create the directory: {e}")))?;
    let shapes = options.preset.shapes();
    let specs = tensor_specs(&shapes);
    let esize = 2u64;

    // Group tensors into shards of at most max_shard_bytes (a tensor larger
    // than that gets a shard of its own).
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut cur = 0u64;
    for (i, s) in specs.iter().enumerate() {
        let b = s.elements() as u64 * esize;
        if cur > 0 && cur + b > options.max_shard_bytes {
            shards.push(Vec::new());
            cur = 0;
        }
        shards.last_mut().expect("non-empty").push(i);
        cur += b;
    }
    let total: u64 = specs.iter().map(|s| s.elements() as u64 * esize).sum();
    let bar = if options.progress {
        let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {wide_msg}",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };

    let n_shards = shards.len();
    let shard_name = |k: usize| {
        if n_shards == 1 {
            "model.safetensors".to_owned()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, n_shards)
        }
    };
    let mut weight_map = Map::new();
    let mut bytes_written = 0u64;
    for (k, members) in shards.iter().enumerate() {
        let name = shard_name(k);
        let path = dir.join(&name);
        bytes_written += write_shard(&path, &specs, members, options, &bar)?;
        for &i in members {
            weight_map.insert(specs[i].name.clone(), Value::String(name.clone()));
        }
    }
    bar.finish_and_clear();
    if n_shards > 1 {
        let index = json!({
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        });
        write_json(&dir.join("model.safetensors.index.json"), &index)?;
    }
    write_json(
        &dir.join("config.json"),
        &config_json(&shapes, options.dtype),
    )?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}),
    )?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "add_bos_token": true,
            "add_eos_token": false,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": null,
            "clean_up_tokenization_spaces": false,
            "legacy": false,
            "model_max_length": shapes.context,
            "tokenizer_class": "LlamaTokenizerFast",
            "chat_template": LLAMA2_CHAT_TEMPLATE,
        }),
    )?;
    write_json(&dir.join("tokenizer.json"), &tokenizer_json(shapes.vocab))?;
    Ok(SynthSummary {
        tensors: specs.len(),
        parameters: specs.iter().map(|s| s.elements() as u64).sum(),
        shards: n_shards,
        bytes: bytes_written,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// LLaMA-2-chat's prompt format.
const LLAMA2_CHAT_TEMPLATE: &str = "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}{% else %}{% set system = none %}{% endif %}{% for message in messages %}{% if message['role'] == 'user' %}{% if loop.first and system %}{{ bos_token + '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] + ' [/INST]' }}{% else %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}{% endfor %}";

/// Writes `bytes` to `path` through a temporary file renamed into place
/// (see [`AtomicFile`]): never a half-written file under `path`.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ToolError> {
    AtomicFile::create(path)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.commit()
        })
        .map_err(|e| ToolError::new(path, format!("cannot write: {e}")))
}

fn write_json(path: &Path, v: &Value) -> Result<(), ToolError> {
    let text = serde_json::to_string_pretty(v).expect("JSON values serialize");
    write_atomically(path, (text + "\n").as_bytes())
}

pub(crate) fn config_json(s: &Shapes, dtype: SynthDtype) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "initializer_range": 0.02,
        "intermediate_size": s.ffn,
        "max_position_embeddings": s.context,
        "num_attention_heads": s.heads,
        "num_hidden_layers": s.layers,
        "num_key_value_heads": s.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": null,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "torch_dtype": dtype.torch_name(),
        "transformers_version": "4.44.0",
        "use_cache": true,
        "vocab_size": s.vocab,
    })
}

/// Writes one safetensors file holding `members` of `specs`, streaming the
/// data in batches generated in parallel. Returns the file size.
fn write_shard(
    path: &Path,
    specs: &[TensorSpec],
    members: &[usize],
    options: &SynthOptions,
    bar: &ProgressBar,
) -> Result<u64, ToolError> {
    let io = |e: std::io::Error| ToolError::new(path, format!("cannot write: {e}"));
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for &i in members {
        let len = specs[i].elements() as u64 * 2;
        header.insert(
            specs[i].name.clone(),
            json!({
                "dtype": options.dtype.safetensors_name(),
                "shape": specs[i].shape,
                "data_offsets": [offset, offset + len],
            }),
        );
        offset += len;
    }
    let mut header = serde_json::to_string(&Value::Object(header)).expect("JSON values serialize");
    // Pad with spaces so the data starts 8-byte aligned, as safetensors'
    // own writer does.
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let mut out = BufWriter::with_capacity(8 << 20, AtomicFile::create(path).map_err(io)?);
    out.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(header.as_bytes()).map_err(io)?;

    let mut values = vec![0f32; BATCH_ELEMS];
    let mut encoded = vec![0u16; BATCH_ELEMS];
    for &i in members {
        let spec = &specs[i];
        bar.set_message(spec.name.clone());
        let n = spec.elements();
        let mut start = 0;
        while start < n {
            let len = (n - start).min(BATCH_ELEMS);
            let (vals, enc) = (&mut values[..len], &mut encoded[..len]);
            vals.par_chunks_mut(TASK_ELEMS)
                .zip(enc.par_chunks_mut(TASK_ELEMS))
                .enumerate()
                .for_each(|(t, (v, e))| {
                    let pos = (start + t * TASK_ELEMS) as u64;
                    fill(options.seed, i as u64, pos, spec.norm, v);
                    match options.dtype {
                        SynthDtype::F16 => {
                            bytemuck::cast_slice_mut::<u16, f16>(e).convert_from_f32_slice(v)
                        }
                        SynthDtype::Bf16 => {
                            bytemuck::cast_slice_mut::<u16, bf16>(e).convert_from_f32_slice(v)
                        }
                    }
                });
            if cfg!(target_endian = "big") {
                for x in enc.iter_mut() {
                    *x = x.to_le();
                }
            }
            out.write_all(bytemuck::cast_slice(enc)).map_err(io)?;
            bar.inc(len as u64 * 2);
            start += len;
        }
    }
    out.into_inner()
        .map_err(|e| e.into_error())
        .and_then(AtomicFile::commit)
        .map_err(io)?;
    Ok(8 + header.len() as u64 + offset)
}

/// A LLaMA-style (SentencePiece BPE with byte fallback) `tokenizer.json`:
/// `<unk>`, `<s>`, `</s>`, the 256 byte tokens, single characters, then
/// merged pieces up to `vocab` entries, each reachable through its merge.
pub fn tokenizer_json(vocab: usize) -> Value {
    let mut pieces: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    pieces.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    let chars: Vec<String> =
        "▁etaoinshrdlcumwfgypbvkjxqzETAOINSHRDLCUMWFGYPBVKJXQZ0123456789.,'!?-:;\"()"
            .chars()
            .map(String::from)
            .collect();
    let mut merges: Vec<(String, String)> = Vec::new();
    let mut known: std::collections::HashSet<String> = pieces.iter().cloned().collect();
    for c in &chars {
        if pieces.len() < vocab && known.insert(c.clone()) {
            pieces.push(c.clone());
        }
    }
    // Breadth-first: extend every existing multi-character piece (and
    // single character) by the most frequent letters until the vocabulary
    // is full. Each new piece is reachable by merging its two halves.
    let alphabet: Vec<&String> = chars.iter().take(27).collect();
    let mut frontier: Vec<String> = chars.clone();
    'outer: while pieces.len() < vocab {
        let mut next = Vec::new();
        for left in &frontier {
            for right in &alphabet {
                if pieces.len() >= vocab {
                    break 'outer;
                }
                if right.as_str() == "▁" {
                    continue;
                }
                let new = format!("{left}{right}");
                if known.insert(new.clone()) {
                    merges.push((left.clone(), (*right).clone()));
                    pieces.push(new.clone());
                    next.push(new);
                }
            }
        }
        if next.is_empty() {
            break;
        }
        frontier = next;
    }
    let vocab_map: Map<String, Value> = pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (p.clone(), json!(i)))
        .collect();
    let special = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab_map,
            "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalish_has_unit_variance() {
        let n = 200_000u64;
        let xs: Vec<f64> = (0..n).map(|i| normalish(mix(i)) as f64).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var - 1.0).abs() < 0.02, "{var}");
    }

    #[test]
    fn official_shapes() {
        let s = Preset::Llama2_70b.shapes();
        assert_eq!(
            (s.hidden, s.layers, s.heads, s.kv_heads, s.ffn),
            (8192, 80, 64, 8, 28672)
        );
        let params: usize = tensor_specs(&Preset::Llama2_7b.shapes())
            .iter()
            .map(|t| t.elements())
            .sum();
        assert_eq!(params, 6_738_415_616);
    }

    #[test]
    fn tokenizer_fills_the_vocabulary() {
        let t = tokenizer_json(32000);
        assert_eq!(t["model"]["vocab"].as_object().unwrap().len(), 32000);
        assert_eq!(t["model"]["vocab"]["<0x41>"], json!(3 + 0x41));
    }
}
