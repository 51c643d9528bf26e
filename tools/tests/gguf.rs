//! GGUF import: the container parser against hand-written and hostile files,
//! the block decoders against hand-computed values and an independent
//! decoder's output, the LLaMA mapping (names, shapes, the Q/K permutation),
//! the tokenizer builder, and the real SmolLM2 GGUF against the safetensors
//! route.

mod common;

use nibble::format::names::{self, LayerTensor};
use nibble::format::{keys, NblFile};
use nibble_tools::convert::{convert, ConvertOptions, QuantPolicy};
use nibble_tools::gguf::dequant::dequantize;
use nibble_tools::gguf::llama::{permuted_row, LlamaGguf};
use nibble_tools::gguf::{GgmlType, GgufFile, MetaValue};
use nibble_tools::source::Source;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn fixture(rel: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(rel)
}

// ---------------------------------------------------------------------------
// A GGUF writer for the tests, written from ggml's docs/gguf.md.

const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

fn gstr(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

#[derive(Clone)]
struct GgufBuilder {
    version: u32,
    alignment: usize,
    kv: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl GgufBuilder {
    fn new() -> Self {
        Self {
            version: 3,
            alignment: 32,
            kv: Vec::new(),
            tensors: Vec::new(),
        }
    }

    fn raw(&mut self, key: &str, ty: u32, payload: Vec<u8>) -> &mut Self {
        self.kv.retain(|(k, _, _)| k != key);
        self.kv.push((key.into(), ty, payload));
        self
    }

    fn u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.raw(key, T_U32, v.to_le_bytes().to_vec())
    }

    fn f32(&mut self, key: &str, v: f32) -> &mut Self {
        self.raw(key, T_F32, v.to_le_bytes().to_vec())
    }

    fn bool(&mut self, key: &str, v: bool) -> &mut Self {
        self.raw(key, T_BOOL, vec![v as u8])
    }

    fn str(&mut self, key: &str, v: &str) -> &mut Self {
        let mut p = Vec::new();
        gstr(&mut p, v);
        self.raw(key, T_STRING, p)
    }

    fn str_array(&mut self, key: &str, v: &[&str]) -> &mut Self {
        let mut p = T_STRING.to_le_bytes().to_vec();
        p.extend((v.len() as u64).to_le_bytes());
        for s in v {
            gstr(&mut p, s);
        }
        self.raw(key, T_ARRAY, p)
    }

    fn f32_array(&mut self, key: &str, v: &[f32]) -> &mut Self {
        let mut p = T_F32.to_le_bytes().to_vec();
        p.extend((v.len() as u64).to_le_bytes());
        for x in v {
            p.extend(x.to_le_bytes());
        }
        self.raw(key, T_ARRAY, p)
    }

    fn i32_array(&mut self, key: &str, v: &[i32]) -> &mut Self {
        let mut p = T_I32.to_le_bytes().to_vec();
        p.extend((v.len() as u64).to_le_bytes());
        for x in v {
            p.extend(x.to_le_bytes());
        }
        self.raw(key, T_ARRAY, p)
    }

    fn remove(&mut self, key: &str) -> &mut Self {
        self.kv.retain(|(k, _, _)| k != key);
        self
    }

    /// `dims` innermost first, as GGUF stores them.
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> &mut Self {
        self.tensors.push((name.into(), dims.to_vec(), ty, data));
        self
    }

    fn f32_tensor(&mut self, name: &str, dims: &[u64], data: &[f32]) -> &mut Self {
        self.tensor(
            name,
            dims,
            0,
            data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }

    fn bytes(&self) -> Vec<u8> {
        let a = self.alignment;
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, ty, p) in &self.kv {
            gstr(&mut out, k);
            out.extend(ty.to_le_bytes());
            out.extend(p);
        }
        let mut offset = 0usize;
        for (name, dims, ty, data) in &self.tensors {
            gstr(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset += data.len().div_ceil(a) * a;
        }
        out.resize(out.len().div_ceil(a) * a, 0);
        for (_, _, _, data) in &self.tensors {
            out.extend(data);
            out.resize(out.len().div_ceil(a) * a, 0);
        }
        out
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, self.bytes()).unwrap();
        p
    }
}

/// llama.cpp's `permute` (convert_hf_to_gguf.py), written as the numpy
/// reshape it is: HF rows viewed as `[heads, 2, hd/2]` become `[heads, hd/2,
/// 2]`.
fn llama_cpp_permute(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..hd / 2 {
                let src = h * hd + j * (hd / 2) + i;
                let dst = h * hd + i * 2 + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// A GGUF with the tiny LLaMA-2-style tokenizer fixture's vocabulary, as
/// llama.cpp's converter writes a SentencePiece one: token types (2 unknown,
/// 3 control, 6 byte, 1 normal) and scores (BPE rank as a negative score).
fn tiny_tokenizer_kv(b: &mut GgufBuilder) -> Vec<String> {
    let tok = read_json(&fixture("tiny/tokenizer/tokenizer.json"));
    let vocab = tok["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (piece, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = piece.clone();
    }
    let types: Vec<i32> = tokens
        .iter()
        .map(|t| match t.as_str() {
            "<unk>" => 2,
            "<s>" | "</s>" => 3,
            t if t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') => 6,
            _ => 1,
        })
        .collect();
    let scores: Vec<f32> = types
        .iter()
        .enumerate()
        .map(|(i, &t)| if t == 1 { -(i as f32) } else { 0.0 })
        .collect();
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    b.str("tokenizer.ggml.model", "llama")
        .str_array("tokenizer.ggml.tokens", &refs)
        .f32_array("tokenizer.ggml.scores", &scores)
        .i32_array("tokenizer.ggml.token_type", &types)
        .u32("tokenizer.ggml.bos_token_id", 1)
        .u32("tokenizer.ggml.eos_token_id", 2)
        .u32("tokenizer.ggml.unknown_token_id", 0)
        .bool("tokenizer.ggml.add_bos_token", true);
    tokens
}

/// A GGUF of the tiny GQA fixture checkpoint (f32 weights), laid out as
/// llama.cpp's converter writes it.
fn tiny_llama_gguf() -> GgufBuilder {
    let dir = fixture("tiny/tiny-gqa-small");
    let cfg = read_json(&dir.join("config.json"));
    let u = |k: &str| cfg[k].as_u64().unwrap() as u32;
    let mut b = GgufBuilder::new();
    b.str("general.architecture", "llama")
        .str("general.name", "tiny-gqa-small")
        .u32("llama.context_length", u("max_position_embeddings"))
        .u32("llama.embedding_length", u("hidden_size"))
        .u32("llama.block_count", u("num_hidden_layers"))
        .u32("llama.feed_forward_length", u("intermediate_size"))
        .u32("llama.rope.dimension_count", u("head_dim"))
        .u32("llama.attention.head_count", u("num_attention_heads"))
        .u32("llama.attention.head_count_kv", u("num_key_value_heads"))
        .f32(
            "llama.attention.layer_norm_rms_epsilon",
            cfg["rms_norm_eps"].as_f64().unwrap() as f32,
        )
        .f32(
            "llama.rope.freq_base",
            cfg["rope_theta"].as_f64().unwrap() as f32,
        );
    tiny_tokenizer_kv(&mut b);
    let source = Source::open(&dir).unwrap();
    let get = |name: &str| -> (Vec<usize>, Vec<f32>) {
        let t = source.get(name).unwrap();
        let v: Vec<f32> = source
            .bytes(t)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (t.shape.clone(), v)
    };
    let mut put = |gname: &str, hf: &str, heads: Option<u32>| {
        let (shape, mut v) = get(hf);
        if let Some(h) = heads {
            v = llama_cpp_permute(&v, shape[0], shape[1], h as usize);
        }
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        b.f32_tensor(gname, &dims, &v);
    };
    put("token_embd.weight", names::TOKEN_EMBEDDING, None);
    for l in 0..u("num_hidden_layers") as usize {
        for (suffix, t) in [
            ("attn_norm", LayerTensor::AttnNorm),
            ("attn_q", LayerTensor::Q),
            ("attn_k", LayerTensor::K),
            ("attn_v", LayerTensor::V),
            ("attn_output", LayerTensor::O),
            ("ffn_norm", LayerTensor::FfnNorm),
            ("ffn_gate", LayerTensor::Gate),
            ("ffn_up", LayerTensor::Up),
            ("ffn_down", LayerTensor::Down),
        ] {
            let heads = match t {
                LayerTensor::Q => Some(u("num_attention_heads")),
                LayerTensor::K => Some(u("num_key_value_heads")),
                _ => None,
            };
            put(&format!("blk.{l}.{suffix}.weight"), &t.name(l), heads);
        }
    }
    put("output_norm.weight", names::FINAL_NORM, None);
    put("output.weight", names::OUTPUT, None);
    b
}

// ---------------------------------------------------------------------------
// Block decoders.

fn f16_bytes(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_bits().to_le_bytes()
}

#[test]
fn q4_0_q4_1_q8_0_hand_built_blocks() {
    // Q4_0: d = 0.5; byte j = (j & 15) | ((15 - j) << 4).
    let mut b = f16_bytes(0.5).to_vec();
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let mut y = [0f32; 32];
    dequantize(GgmlType::Q4_0, &b, &mut y);
    for j in 0..16 {
        assert_eq!(y[j], 0.5 * (j as f32 - 8.0));
        assert_eq!(y[j + 16], 0.5 * ((15 - j) as f32 - 8.0));
    }
    // Q4_1: d = 0.25, m = -1.0: x = 0.25 q - 1.
    let mut b = f16_bytes(0.25).to_vec();
    b.extend(f16_bytes(-1.0));
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    dequantize(GgmlType::Q4_1, &b, &mut y);
    for j in 0..16 {
        assert_eq!(y[j], 0.25 * j as f32 - 1.0);
        assert_eq!(y[j + 16], 0.25 * (15 - j) as f32 - 1.0);
    }
    // Q8_0: d = 2; q = j - 16 (signed).
    let mut b = f16_bytes(2.0).to_vec();
    b.extend((0..32i32).map(|j| (j - 16) as i8 as u8));
    dequantize(GgmlType::Q8_0, &b, &mut y);
    for (j, v) in y.iter().enumerate() {
        assert_eq!(*v, 2.0 * (j as f32 - 16.0));
    }
}

#[test]
fn f16_bf16_f32_elements() {
    let mut y = [0f32; 3];
    let b: Vec<u8> = [1.5f32, -2.0, 65504.0]
        .iter()
        .flat_map(|&x| f16_bytes(x))
        .collect();
    dequantize(GgmlType::F16, &b, &mut y);
    assert_eq!(y, [1.5, -2.0, 65504.0]);
    // bf16 is the top half of an f32.
    let b: Vec<u8> = [1.5f32, -3.0e38, 1.0e-3]
        .iter()
        .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
        .collect();
    dequantize(GgmlType::Bf16, &b, &mut y);
    assert_eq!(y[0], 1.5);
    assert_eq!(y[1].to_bits(), (-3.0e38f32).to_bits() & 0xFFFF_0000);
    assert_eq!(y[2].to_bits(), 1.0e-3f32.to_bits() & 0xFFFF_0000);
    let b: Vec<u8> = [0.1f32, -7.0, 3.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    dequantize(GgmlType::F32, &b, &mut y);
    assert_eq!(y, [0.1, -7.0, 3.0]);
}

/// Packs 6-bit scales and mins of the 8 sub-blocks the way ggml's
/// `quantize_row_q4_K_ref` does.
fn pack_k4_scales(sc: [u8; 8], mn: [u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            q[j] = sc[j];
            q[j + 4] = mn[j];
        } else {
            q[j + 4] = (sc[j] & 0xF) | ((mn[j] & 0xF) << 4);
            q[j - 4] |= (sc[j] >> 4) << 6;
            q[j] |= (mn[j] >> 4) << 6;
        }
    }
    q
}

#[test]
fn q4_k_and_q5_k_hand_built_blocks() {
    // Sub-block s has scale 3 + 7s (up to 52, using the high bits) and min
    // 60 - 5s; weight k of sub-block s has quant (k + s) % 16 (Q4_K) and,
    // for Q5_K, a fifth bit set when k is odd.
    let sc: [u8; 8] = std::array::from_fn(|s| 3 + 7 * s as u8);
    let mn: [u8; 8] = std::array::from_fn(|s| 60 - 5 * s as u8);
    let (d, dmin) = (0.125f32, 0.0625f32);
    let quant = |s: usize, k: usize| ((k + s) % 16) as u8;
    let mut qs = [0u8; 128];
    for chunk in 0..4 {
        for l in 0..32 {
            qs[chunk * 32 + l] = quant(2 * chunk, l) | (quant(2 * chunk + 1, l) << 4);
        }
    }
    let mut b4 = f16_bytes(d).to_vec();
    b4.extend(f16_bytes(dmin));
    b4.extend(pack_k4_scales(sc, mn));
    b4.extend(qs);
    let mut y = [0f32; 256];
    dequantize(GgmlType::Q4K, &b4, &mut y);
    for s in 0..8 {
        for k in 0..32 {
            let want = (d * sc[s] as f32) * quant(s, k) as f32 - dmin * mn[s] as f32;
            assert_eq!(y[s * 32 + k], want, "Q4_K sub-block {s} weight {k}");
        }
    }
    // Q5_K: qh bit s of byte k is the fifth bit of weight k of sub-block s.
    let high = |_s: usize, k: usize| k % 2 == 1;
    let mut qh = [0u8; 32];
    for (k, byte) in qh.iter_mut().enumerate() {
        for s in 0..8 {
            if high(s, k) {
                *byte |= 1 << s;
            }
        }
    }
    let mut b5 = f16_bytes(d).to_vec();
    b5.extend(f16_bytes(dmin));
    b5.extend(pack_k4_scales(sc, mn));
    b5.extend(qh);
    b5.extend(qs);
    dequantize(GgmlType::Q5K, &b5, &mut y);
    for s in 0..8 {
        for k in 0..32 {
            let q = quant(s, k) as f32 + if high(s, k) { 16.0 } else { 0.0 };
            let want = (d * sc[s] as f32) * q - dmin * mn[s] as f32;
            assert_eq!(y[s * 32 + k], want, "Q5_K sub-block {s} weight {k}");
        }
    }
}

#[test]
fn q6_k_hand_built_block() {
    // Weight w (0..256) has 6-bit quant (w * 7) % 64 and sub-block w / 16
    // has scale 5 - sub (negative for later sub-blocks).
    let quant = |w: usize| ((w * 7) % 64) as u8;
    let scale = |sub: usize| 5 - sub as i8;
    let d = 0.03125f32;
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    // ggml's layout per 128-weight half n: weights n*128 + l + 32*g for
    // g in 0..4, l in 0..32; low nibbles of g=0,1 in ql[64n + l (+32)], of
    // g=2,3 in their high nibbles; the 2 high bits of group g in bits 2g of
    // qh[32n + l].
    for n in 0..2 {
        for l in 0..32 {
            for g in 0..4 {
                let q = quant(n * 128 + l + 32 * g);
                let at = 64 * n + l + 32 * (g % 2);
                ql[at] |= (q & 0xF) << (4 * (g / 2));
                qh[32 * n + l] |= (q >> 4) << (2 * g);
            }
        }
    }
    let mut b = ql.to_vec();
    b.extend(qh);
    b.extend((0..16).map(|s| scale(s) as u8));
    b.extend(f16_bytes(d));
    let mut y = [0f32; 256];
    dequantize(GgmlType::Q6K, &b, &mut y);
    for (w, &got) in y.iter().enumerate() {
        let want = (d * scale(w / 16) as f32) * (quant(w) as i32 - 32) as f32;
        assert_eq!(got, want, "Q6_K weight {w}");
    }
}

/// Random blocks decoded by the `gguf` Python package, an implementation
/// independent of ours (tests/fixtures/gguf/make_ggml_blocks.py).
#[test]
fn decoders_match_the_gguf_python_package_bit_for_bit() {
    let cases = read_json(&fixture("gguf/ggml_blocks.json"));
    let mut seen = Vec::new();
    for case in cases["cases"].as_array().unwrap() {
        let name = case["type"].as_str().unwrap();
        let ty = GgmlType::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .unwrap();
        let hex = case["bytes"].as_str().unwrap();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let want: Vec<u32> = case["f32_bits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let mut y = vec![0f32; want.len()];
        dequantize(ty, &bytes, &mut y);
        for (i, (a, &w)) in y.iter().zip(&want).enumerate() {
            assert_eq!(
                a.to_bits(),
                w,
                "{name} weight {i}: {a} vs {}",
                f32::from_bits(w)
            );
        }
        seen.push(ty);
    }
    for ty in GgmlType::ALL {
        assert!(
            ty == GgmlType::F32 || seen.contains(&ty),
            "no vectors for {ty}"
        );
    }
}

// ---------------------------------------------------------------------------
// Container parsing.

#[test]
fn parses_every_value_type_nested_arrays_and_alignment() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = GgufBuilder::new();
    b.alignment = 64;
    b.raw("general.alignment", T_U32, 64u32.to_le_bytes().to_vec())
        .raw("a.u8", T_U8, vec![200])
        .raw("a.i8", T_I8, vec![0xFE])
        .raw("a.u16", T_U16, 60000u16.to_le_bytes().to_vec())
        .raw("a.i16", T_I16, (-300i16).to_le_bytes().to_vec())
        .raw("a.i32", T_I32, (-70000i32).to_le_bytes().to_vec())
        .raw("a.u64", T_U64, (1u64 << 40).to_le_bytes().to_vec())
        .raw("a.i64", T_I64, (-(1i64 << 40)).to_le_bytes().to_vec())
        .raw("a.f64", T_F64, 2.5f64.to_le_bytes().to_vec())
        .u32("a.u32", 7)
        .f32("a.f32", -0.5)
        .bool("a.bool", true)
        .str("a.str", "héllo");
    // [[1, 2], []] as an array of u16 arrays.
    let mut nested = T_ARRAY.to_le_bytes().to_vec();
    nested.extend(2u64.to_le_bytes());
    nested.extend(T_U16.to_le_bytes());
    nested.extend(2u64.to_le_bytes());
    nested.extend(1u16.to_le_bytes());
    nested.extend(2u16.to_le_bytes());
    nested.extend(T_U16.to_le_bytes());
    nested.extend(0u64.to_le_bytes());
    b.raw("a.nested", T_ARRAY, nested);
    b.f32_tensor("x", &[3], &[1.0, 2.0, 3.0]);
    b.f32_tensor("y", &[2, 2], &[4.0, 5.0, 6.0, 7.0]);
    let path = b.write(dir.path(), "all.gguf");
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 64);
    let m = |k: &str| f.get(k).unwrap().clone();
    assert_eq!(m("a.u8"), MetaValue::U8(200));
    assert_eq!(m("a.i8"), MetaValue::I8(-2));
    assert_eq!(m("a.u16"), MetaValue::U16(60000));
    assert_eq!(m("a.i16"), MetaValue::I16(-300));
    assert_eq!(m("a.i32"), MetaValue::I32(-70000));
    assert_eq!(m("a.u64"), MetaValue::U64(1 << 40));
    assert_eq!(m("a.i64"), MetaValue::I64(-(1 << 40)));
    assert_eq!(m("a.f64"), MetaValue::F64(2.5));
    assert_eq!(m("a.u32"), MetaValue::U32(7));
    assert_eq!(m("a.f32"), MetaValue::F32(-0.5));
    assert_eq!(m("a.bool"), MetaValue::Bool(true));
    assert_eq!(m("a.str"), MetaValue::Str("héllo".into()));
    let nested = m("a.nested");
    let outer = nested.as_array().unwrap();
    assert_eq!(outer.len(), 2);
    assert_eq!(
        outer[0].as_array().unwrap(),
        &[MetaValue::U16(1), MetaValue::U16(2)]
    );
    assert!(outer[1].as_array().unwrap().is_empty());
    let y = f.tensor("y").unwrap();
    assert_eq!(y.dims, vec![2, 2]);
    assert_eq!(y.start % 64, 0);
    let vals: Vec<f32> = f
        .bytes(y)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(vals, [4.0, 5.0, 6.0, 7.0]);
    // Version 2 has the same layout.
    b.version = 2;
    let path = b.write(dir.path(), "v2.gguf");
    assert_eq!(GgufFile::open(&path).unwrap().version(), 2);
}

fn open_err(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.gguf");
    std::fs::write(&p, bytes).unwrap();
    match GgufFile::open(&p) {
        Ok(_) => panic!("opened a bad file"),
        Err(e) => {
            let m = e.message().to_owned();
            assert!(m.starts_with(&p.display().to_string()), "{m}");
            assert!(!m.contains('\n'), "{m}");
            m
        }
    }
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let mut b = GgufBuilder::new();
    b.str("general.architecture", "llama")
        .str_array("s", &["a", "bc"])
        .u32("n", 3);
    b.f32_tensor("t", &[8], &[1.0; 8]);
    let bytes = b.bytes();
    let dir = tempfile::tempdir().unwrap();
    let ok = dir.path().join("ok.gguf");
    std::fs::write(&ok, &bytes).unwrap();
    GgufFile::open(&ok).unwrap();
    for len in 0..bytes.len() {
        open_err(&bytes[..len]);
    }
    assert!(open_err(&bytes[..bytes.len() - 4]).contains("past the end of the file"));
    assert!(open_err(&bytes[..30]).contains("truncated"));
}

#[test]
fn wrong_magic_version_and_hostile_counts() {
    let good = {
        let mut b = GgufBuilder::new();
        b.str("general.architecture", "llama");
        b.f32_tensor("t", &[8], &[0.0; 8]);
        b
    };
    let mut bytes = good.bytes();
    bytes[0..4].copy_from_slice(b"GGML");
    assert!(open_err(&bytes).contains("not a GGUF file"));
    let mut v = good.clone();
    v.version = 1;
    assert!(open_err(&v.bytes()).contains("version 1 is not supported"));
    let mut bytes = good.bytes();
    bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(open_err(&bytes).contains("big-endian"));
    // A tensor count of 2^60 and a metadata count of 2^60: rejected before
    // anything is allocated for them.
    let mut bytes = good.bytes();
    bytes[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(open_err(&bytes).contains("tensors, more than the file can hold"));
    let mut bytes = good.bytes();
    bytes[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(open_err(&bytes).contains("metadata entries"));
    // An array claiming 2^62 elements, and a string claiming 2^62 bytes.
    let mut b = GgufBuilder::new();
    let mut p = T_U32.to_le_bytes().to_vec();
    p.extend((1u64 << 62).to_le_bytes());
    b.raw("huge", T_ARRAY, p);
    assert!(open_err(&b.bytes()).contains("claims 4611686018427387904 u32 elements"));
    let mut b = GgufBuilder::new();
    b.raw("huge", T_STRING, (1u64 << 62).to_le_bytes().to_vec());
    assert!(open_err(&b.bytes()).contains("claims 4611686018427387904 bytes"));
    // Arrays nested past any sane depth.
    let mut deep = Vec::new();
    for _ in 0..100 {
        deep.extend(T_ARRAY.to_le_bytes());
        deep.extend(1u64.to_le_bytes());
    }
    deep.extend(T_U8.to_le_bytes());
    deep.extend(0u64.to_le_bytes());
    let mut b = GgufBuilder::new();
    b.raw("deep", T_ARRAY, deep);
    assert!(open_err(&b.bytes()).contains("nests arrays"));
    // Unknown value type, bad bool, duplicate key, bad alignment.
    let mut b = GgufBuilder::new();
    b.raw("x", 99, vec![]);
    assert!(open_err(&b.bytes()).contains("unknown value type 99"));
    let mut b = GgufBuilder::new();
    b.raw("x", T_BOOL, vec![7]);
    assert!(open_err(&b.bytes()).contains("not 0 or 1"));
    let mut b = GgufBuilder::new();
    b.u32("x", 1);
    b.kv.push(("x".into(), T_U32, 2u32.to_le_bytes().to_vec()));
    assert!(open_err(&b.bytes()).contains("appears twice"));
    let mut b = GgufBuilder::new();
    b.u32("general.alignment", 24);
    assert!(open_err(&b.bytes()).contains("power of two"));
}

#[test]
fn bad_tensor_directories() {
    let base = || {
        let mut b = GgufBuilder::new();
        b.str("general.architecture", "llama");
        b
    };
    // Types nibble cannot decode (Q5_0 = 6, IQ2_XXS = 16) and unknown ids.
    let mut b = base();
    b.tensor("t", &[32], 6, vec![0; 22]);
    let e = open_err(&b.bytes());
    assert!(
        e.contains("tensor 't' has type Q5_0 (id 6), which nibble cannot import"),
        "{e}"
    );
    let mut b = base();
    b.tensor("t", &[32], 1000, vec![0; 64]);
    assert!(open_err(&b.bytes()).contains("type unknown (id 1000)"));
    // A row that is not a whole number of blocks.
    let mut b = base();
    b.tensor("t", &[16, 2], 8, vec![0; 34]);
    assert!(open_err(&b.bytes()).contains("not a multiple of its block size 32"));
    // Zero and too many dimensions, overflowing sizes.
    let mut b = base();
    b.tensor("t", &[0], 0, vec![]);
    assert!(open_err(&b.bytes()).contains("empty or too large"));
    let mut b = base();
    b.tensor("t", &[1, 1, 1, 1, 1], 0, vec![0; 4]);
    assert!(open_err(&b.bytes()).contains("5 dimensions"));
    let mut b = base();
    b.tensor("t", &[1 << 40, 1 << 40], 0, vec![0; 4]);
    assert!(open_err(&b.bytes()).contains("empty or too large"));
    // Duplicate names, overlapping tensors, misaligned offsets.
    let mut b = base();
    b.f32_tensor("t", &[8], &[0.0; 8])
        .f32_tensor("t", &[8], &[0.0; 8]);
    assert!(open_err(&b.bytes()).contains("appears twice"));
    let mut b = base();
    b.f32_tensor("a", &[8], &[0.0; 8])
        .f32_tensor("b", &[16], &[0.0; 16]);
    let mut bytes = b.bytes();
    // Point b's offset (the last u64 of the directory) at a's data.
    let dir_end = bytes.len() - 32 - 64;
    let at = (0..dir_end)
        .rev()
        .find(|&i| bytes[i..i + 8] == 32u64.to_le_bytes())
        .unwrap();
    bytes[at..at + 8].copy_from_slice(&0u64.to_le_bytes());
    assert!(open_err(&bytes).contains("overlap"));
    bytes[at..at + 8].copy_from_slice(&4u64.to_le_bytes());
    assert!(open_err(&bytes).contains("not a multiple of the alignment"));
}

// ---------------------------------------------------------------------------
// LLaMA mapping.

#[test]
fn permutation_inverts_llama_cpp() {
    for (rows, heads) in [(64, 4), (48, 3), (8, 1)] {
        let cols = 3;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let g = llama_cpp_permute(&hf, rows, cols, heads);
        for r in 0..rows {
            let src = permuted_row(r, rows / heads);
            assert_eq!(
                &g[src * cols..(src + 1) * cols],
                &hf[r * cols..(r + 1) * cols]
            );
        }
    }
}

fn nbl_f32(f: &NblFile, name: &str) -> Vec<f32> {
    f.require(name).unwrap().f32s().unwrap().to_vec()
}

#[test]
fn synthetic_llama_gguf_converts_like_the_safetensors_route() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_llama_gguf().write(dir.path(), "tiny.gguf");
    let from_gguf = dir.path().join("gguf.nbl");
    let from_hf = dir.path().join("hf.nbl");
    convert(&ConvertOptions::new(&gguf, &from_gguf, QuantPolicy::F32)).unwrap();
    convert(&ConvertOptions::new(
        fixture("tiny/tiny-gqa-small"),
        &from_hf,
        QuantPolicy::F32,
    ))
    .unwrap();
    let a = NblFile::open(&from_gguf).unwrap();
    let b = NblFile::open(&from_hf).unwrap();
    let names_a: Vec<String> = a.tensors().iter().map(|t| t.name.clone()).collect();
    let names_b: Vec<String> = b.tensors().iter().map(|t| t.name.clone()).collect();
    assert_eq!(names_a, names_b);
    for n in &names_a {
        assert_eq!(
            a.require(n).unwrap().info.shape,
            b.require(n).unwrap().info.shape,
            "{n}"
        );
        assert_eq!(nbl_f32(&a, n), nbl_f32(&b, n), "{n}");
    }
    for key in [
        keys::VOCAB_SIZE,
        keys::HIDDEN_SIZE,
        keys::NUM_LAYERS,
        keys::NUM_HEADS,
        keys::NUM_KV_HEADS,
        keys::HEAD_DIM,
        keys::INTERMEDIATE_SIZE,
        keys::CONTEXT_LENGTH,
        keys::ROPE_THETA,
        keys::RMS_NORM_EPS,
        keys::TIE_WORD_EMBEDDINGS,
        keys::BOS_TOKEN_ID,
        keys::EOS_TOKEN_IDS,
        keys::ADD_BOS_TOKEN,
    ] {
        assert_eq!(a.metadata().get(key), b.metadata().get(key), "{key}");
    }
    let sources = a.metadata().get(keys::SOURCE_FILES).unwrap();
    assert!(format!("{sources:?}").contains("tiny.gguf"));
    // q4 through the same policy: byte-identical to the HF route.
    convert(&ConvertOptions::new(&gguf, &from_gguf, QuantPolicy::Q4)).unwrap();
    convert(&ConvertOptions::new(
        fixture("tiny/tiny-gqa-small"),
        &from_hf,
        QuantPolicy::Q4,
    ))
    .unwrap();
    let a = NblFile::open(&from_gguf).unwrap();
    let b = NblFile::open(&from_hf).unwrap();
    for t in a.tensors() {
        let u = b.require(&t.name).unwrap();
        assert_eq!(t.type_id, u.info.type_id, "{}", t.name);
        assert_eq!(a.require(&t.name).unwrap().bytes, u.bytes, "{}", t.name);
    }
}

#[test]
fn tied_embeddings_when_output_is_absent_and_quantized_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = tiny_llama_gguf();
    b.tensors.retain(|t| t.0 != "output.weight");
    // Store one matrix as F16 and one as Q8_0 to cover the non-f32 paths.
    for t in b.tensors.iter_mut() {
        let vals: Vec<f32> =
            t.3.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
        if t.0 == "blk.0.ffn_up.weight" {
            t.2 = 1;
            t.3 = vals.iter().flat_map(|&x| f16_bytes(x)).collect();
        } else if t.0 == "blk.1.attn_k.weight" {
            t.2 = 8;
            t.3 = vals
                .chunks_exact(32)
                .flat_map(|blk| {
                    let amax = blk.iter().fold(0f32, |m, x| m.max(x.abs()));
                    let d = amax / 127.0;
                    let mut out = f16_bytes(d).to_vec();
                    let dh = half::f16::from_f32(d).to_f32();
                    out.extend(blk.iter().map(|&x| (x / dh).round() as i8 as u8));
                    out
                })
                .collect();
        }
    }
    let path = b.write(dir.path(), "tied.gguf");
    let model = LlamaGguf::open(&path).unwrap();
    assert!(model.config.tie_word_embeddings);
    assert_eq!(model.config.num_key_value_heads, 2);
    // The Q8_0 K projection decodes to d·q in HF row order.
    let k = model.dequantize(&LayerTensor::K.name(1)).unwrap();
    let t = model.file.tensor("blk.1.attn_k.weight").unwrap();
    let raw = model.file.bytes(t);
    let cols = 128;
    let hd = 16;
    for r in 0..32 {
        let g = permuted_row(r, hd);
        for c in 0..cols {
            let blk = &raw[(g * cols + c) / 32 * 34..][..34];
            let d = half::f16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32();
            assert_eq!(k[r * cols + c], blk[2 + c % 32] as i8 as f32 * d);
        }
    }
    let out = dir.path().join("tied.nbl");
    convert(&ConvertOptions::new(&path, &out, QuantPolicy::Q8)).unwrap();
    let f = NblFile::open(&out).unwrap();
    assert!(f.tensor(names::OUTPUT).is_none());
}

fn gguf_err(b: &GgufBuilder) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = b.write(dir.path(), "m.gguf");
    let out = dir.path().join("m.nbl");
    let e = convert(&ConvertOptions::new(&p, &out, QuantPolicy::Q4)).unwrap_err();
    assert!(!out.exists(), "a failed conversion left {out:?}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "temporary files left: {leftovers:?}");
    assert!(e.message().starts_with(&p.display().to_string()), "{e}");
    e.message().to_owned()
}

#[test]
fn unsupported_models_are_rejected_with_clear_errors() {
    let mut b = tiny_llama_gguf();
    b.str("general.architecture", "qwen2");
    assert!(gguf_err(&b).contains("architecture 'qwen2' is not supported (only 'llama')"));
    let mut b = tiny_llama_gguf();
    b.remove("general.architecture");
    assert!(gguf_err(&b).contains("'general.architecture' is missing"));
    let mut b = tiny_llama_gguf();
    b.remove("llama.block_count");
    assert!(gguf_err(&b).contains("'llama.block_count' is missing"));
    let mut b = tiny_llama_gguf();
    b.str("llama.block_count", "two");
    assert!(gguf_err(&b).contains("'llama.block_count' should be a non-negative integer"));
    let mut b = tiny_llama_gguf();
    b.u32("llama.expert_count", 8);
    assert!(gguf_err(&b).contains("mixture-of-experts"));
    let mut b = tiny_llama_gguf();
    b.str("llama.rope.scaling.type", "yarn");
    assert!(gguf_err(&b).contains("'yarn' is not supported"));
    let mut b = tiny_llama_gguf();
    b.u32("llama.block_count", 3);
    assert!(gguf_err(&b).contains("tensor 'blk.2.attn_norm.weight' is missing"));
    let mut b = tiny_llama_gguf();
    b.u32("llama.block_count", 1);
    assert!(gguf_err(&b).contains("unexpected tensor 'blk.1."));
    let mut b = tiny_llama_gguf();
    b.u32("llama.feed_forward_length", 64);
    assert!(gguf_err(&b).contains("has dimensions"));
    let mut b = tiny_llama_gguf();
    b.f32_tensor("rope_freqs.weight", &[8], &[1.0; 8]);
    assert!(gguf_err(&b).contains("rope frequency scaling is not supported"));
    let mut b = tiny_llama_gguf();
    b.tensors[3].2 = 6; // Q5_0
    assert!(gguf_err(&b).contains("which nibble cannot import"));
    let mut b = tiny_llama_gguf();
    b.str("tokenizer.ggml.model", "bert");
    assert!(gguf_err(&b).contains("tokenizer model 'bert' is not supported"));
    let mut b = tiny_llama_gguf();
    b.u32("tokenizer.ggml.bos_token_id", 100000);
    assert!(gguf_err(&b).contains("outside the vocabulary"));
    // Truncated: the last tensor's bytes are cut off.
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_llama_gguf().write(dir.path(), "cut.gguf");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    let out = dir.path().join("cut.nbl");
    let e = convert(&ConvertOptions::new(&p, &out, QuantPolicy::Q4)).unwrap_err();
    assert!(
        e.message().contains("extends past the end of the file"),
        "{e}"
    );
    assert!(!out.exists());
}

#[test]
fn converting_a_gguf_over_itself_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_llama_gguf().write(dir.path(), "m.gguf");
    let bytes = std::fs::read(&p).unwrap();
    let link = dir.path().join("link.nbl");
    std::os::unix::fs::symlink(&p, &link).unwrap();
    let hard = dir.path().join("hard.nbl");
    std::fs::hard_link(&p, &hard).unwrap();
    for out in [&p, &link, &hard] {
        let e = convert(&ConvertOptions::new(&p, out, QuantPolicy::Q8)).unwrap_err();
        assert!(e.message().contains("is the input file"), "{e}");
        let cli = Command::new(env!("CARGO_BIN_EXE_nibble-tools"))
            .arg("convert")
            .arg(&p)
            .arg("-o")
            .arg(out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&cli.stderr);
        assert_eq!(cli.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains("is the input file"),
            "{stderr}"
        );
        assert_eq!(std::fs::read(&p).unwrap(), bytes, "the input changed");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        3,
        "no temporaries left"
    );
}

// ---------------------------------------------------------------------------
// Tokenizers.

fn tokenizer_of(path: &Path) -> (tokenizers::Tokenizer, nibble_tools::hf::TokenizerInfo) {
    let model = LlamaGguf::open(path).unwrap();
    let tok = tokenizers::Tokenizer::from_bytes(model.tokenizer.tokenizer_json.as_bytes()).unwrap();
    (tok, model.tokenizer)
}

#[test]
fn sentencepiece_tokenizer_matches_the_hf_llama_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_llama_gguf().write(dir.path(), "tiny.gguf");
    let (tok, info) = tokenizer_of(&path);
    assert_eq!(info.bos_token_id, Some(1));
    assert_eq!(info.eos_token_ids, vec![2]);
    assert!(info.add_bos_token);
    let hf = tokenizers::Tokenizer::from_file(fixture("tiny/tokenizer/tokenizer.json")).unwrap();
    // Merges derived from the scores list every split of each piece; the
    // fixture's trained merges (one per piece) appear among them in order.
    let ours_json: Value = serde_json::from_str(&info.tokenizer_json).unwrap();
    let hf_json = read_json(&fixture("tiny/tokenizer/tokenizer.json"));
    let ours_merges = ours_json["model"]["merges"].as_array().unwrap();
    let mut rest = ours_merges.iter();
    for m in hf_json["model"]["merges"].as_array().unwrap() {
        assert!(rest.any(|o| o == m), "merge {m} missing or out of order");
    }
    assert_eq!(ours_json["normalizer"], hf_json["normalizer"]);
    assert_eq!(ours_json["decoder"], hf_json["decoder"]);
    let cases = read_json(&fixture("tiny/tokenizer/tokenizer_cases.json"));
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ours = tok.encode(text, true).unwrap();
        assert_eq!(ours.get_ids(), &want[..], "{text:?}");
        assert_eq!(
            hf.encode(text, true).unwrap().get_ids(),
            &want[..],
            "{text:?} (fixture check)"
        );
        assert_eq!(
            tok.decode(ours.get_ids(), true).unwrap(),
            hf.decode(&want, true).unwrap(),
            "decode {text:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// The real SmolLM2-135M-Instruct Q4_1 GGUF.

fn nibble_cache() -> PathBuf {
    match std::env::var_os("NIBBLE_CACHE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/nibble"),
    }
}

/// The f32 HF checkpoint built from the GGUF (which make.sh also caches).
fn smollm2() -> (PathBuf, PathBuf) {
    let dest = repo_root().join("target/models/smollm2-f32");
    let gguf = nibble_cache().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !dest.join(".made-f32").exists() || !gguf.exists() {
        let status = Command::new("bash")
            .arg(common::smollm2_script())
            .arg(&dest)
            .arg("f32")
            .status()
            .expect("bash runs");
        assert!(status.success(), "make.sh failed");
    }
    (gguf, dest)
}

#[test]
fn smollm2_gguf_weights_equal_the_safetensors_route() {
    if !common::have_shared() {
        return;
    }
    let (gguf, hf_dir) = smollm2();
    let model = LlamaGguf::open(&gguf).unwrap();
    let c = &model.config;
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads
        ),
        (49152, 576, 30, 9, 3)
    );
    assert_eq!(
        (c.head_dim, c.intermediate_size, c.max_position_embeddings),
        (64, 1536, 8192)
    );
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert!(c.tie_word_embeddings);
    let source = Source::open(&hf_dir).unwrap();
    let mut compared = 0;
    for name in model.tensor_names().map(str::to_owned).collect::<Vec<_>>() {
        let ours = model.dequantize(&name).unwrap();
        let t = source
            .get(&name)
            .unwrap_or_else(|| panic!("{name} not in the checkpoint"));
        assert_eq!(t.shape, model.gguf_tensor(&name).unwrap().shape(), "{name}");
        let theirs = source.bytes(t);
        assert_eq!(theirs.len(), ours.len() * 4);
        for (i, (a, b)) in ours.iter().zip(theirs.chunks_exact(4)).enumerate() {
            let b = f32::from_le_bytes(b.try_into().unwrap());
            assert_eq!(a.to_bits(), b.to_bits(), "{name}[{i}]: {a} vs {b}");
        }
        compared += 1;
    }
    assert_eq!(compared, 2 + 30 * 9);
}

#[test]
fn smollm2_gguf_tokenizer_matches_the_hf_tokenizer() {
    if !common::have_shared() {
        return;
    }
    let (gguf, hf_dir) = smollm2();
    let (tok, info) = tokenizer_of(&gguf);
    assert_eq!(info.bos_token_id, Some(1));
    assert_eq!(info.eos_token_ids, vec![2]);
    assert_eq!(info.eos_token.as_deref(), Some("<|im_end|>"));
    assert!(!info.add_bos_token);
    let template = std::fs::read_to_string(hf_dir.join("chat_template.jinja")).unwrap();
    assert_eq!(
        info.chat_template.as_deref().map(str::trim),
        Some(template.trim())
    );
    let cases = read_json(&fixture("smollm2/tokenizer_cases.json"));
    let hf = tokenizers::Tokenizer::from_file(hf_dir.join("tokenizer.json")).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ours = tok.encode(text, true).unwrap();
        assert_eq!(ours.get_ids(), &want[..], "{text:?}");
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            hf.decode(&want, false).unwrap(),
            "decode {text:?}"
        );
    }
    assert_eq!(tok.get_vocab_size(true), hf.get_vocab_size(true));
}

#[test]
fn smollm2_gguf_converts_to_the_same_nbl_tensors_as_the_safetensors_route() {
    if !common::have_shared() {
        return;
    }
    let (gguf, hf_dir) = smollm2();
    let dir = tempfile::tempdir().unwrap();
    let (a_path, b_path) = (dir.path().join("gguf.nbl"), dir.path().join("hf.nbl"));
    convert(&ConvertOptions::new(&gguf, &a_path, QuantPolicy::Q4)).unwrap();
    convert(&ConvertOptions::new(&hf_dir, &b_path, QuantPolicy::Q4)).unwrap();
    let (a, b) = (
        NblFile::open(&a_path).unwrap(),
        NblFile::open(&b_path).unwrap(),
    );
    a.verify_checksums().unwrap();
    assert_eq!(a.tensors().len(), b.tensors().len());
    for t in a.tensors() {
        let u = b.require(&t.name).unwrap();
        assert_eq!(
            (t.type_id, &t.shape),
            (u.info.type_id, &u.info.shape),
            "{}",
            t.name
        );
        assert_eq!(a.require(&t.name).unwrap().bytes, u.bytes, "{}", t.name);
    }
    let src = a.metadata().get(keys::SOURCE_FILES).unwrap();
    assert!(format!("{src:?}").contains("SmolLM2-135M-Instruct.Q4_1.gguf"));
}

/// `n` greedy tokens after `prompt` (encoded by the model's own tokenizer).
fn greedy(model: &nibble::Model, prompt: &str, n: usize) -> (Vec<u32>, Vec<u32>) {
    let ids = model.tokenizer().encode(prompt, true).unwrap();
    let opts = nibble::SessionOptions {
        ctx: Some(256),
        ..Default::default()
    };
    let mut session = nibble::Session::new(model, opts).unwrap();
    let mut logits = session.forward(&ids).unwrap().to_vec();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = nibble::sampler::argmax(&logits);
        out.push(t);
        logits = session.forward(&[t]).unwrap().to_vec();
    }
    (ids, out)
}

#[test]
fn smollm2_gguf_and_safetensors_routes_continue_prompts_identically() {
    if !common::have_shared() {
        return;
    }
    let (gguf, hf_dir) = smollm2();
    let dir = repo_root().join("target/models/gguf-test");
    std::fs::create_dir_all(&dir).unwrap();
    let (a_path, b_path) = (dir.join("from-gguf-f32.nbl"), dir.join("from-hf-f32.nbl"));
    convert(&ConvertOptions::new(&gguf, &a_path, QuantPolicy::F32)).unwrap();
    convert(&ConvertOptions::new(&hf_dir, &b_path, QuantPolicy::F32)).unwrap();
    let a = nibble::Model::open(&a_path).unwrap();
    let b = nibble::Model::open(&b_path).unwrap();
    let chat =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    for prompt in [
        "The capital of France is",
        "Once upon a time, in a village by the sea,",
        chat,
    ] {
        let (ids_a, out_a) = greedy(&a, prompt, 16);
        let (ids_b, out_b) = greedy(&b, prompt, 16);
        assert_eq!(ids_a, ids_b, "prompt ids for {prompt:?}");
        assert_eq!(out_a, out_b, "continuation of {prompt:?}");
        let text = a.tokenizer().decode(&out_a).unwrap();
        if prompt.starts_with("The capital") {
            assert!(text.starts_with(" Paris"), "{text:?}");
        }
    }
}

/// A byte-level BPE vocabulary over digits whose merges build "1234" from
/// the left, so the pre-tokenizer's digit splitting decides the result.
fn digit_bpe_tokenizer(pre: Option<&str>, add_bos: bool) -> Vec<u32> {
    let dir = tempfile::tempdir().unwrap();
    let mut b = tiny_llama_gguf();
    let mut tokens: Vec<String> = vec!["<|begin_of_text|>".into()];
    tokens.extend(["1", "2", "3", "4", "5", "12", "123", "1234"].map(String::from));
    // Pad to the model's vocabulary so the tensor shapes still fit.
    let vocab = 512;
    tokens.extend((tokens.len()..vocab).map(|i| format!("<pad{i}>")));
    let types: Vec<i32> = (0..vocab)
        .map(|i| if i == 0 || i >= 9 { 3 } else { 1 })
        .collect();
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    b.str("tokenizer.ggml.model", "gpt2")
        .remove("tokenizer.ggml.scores")
        .remove("tokenizer.ggml.unknown_token_id")
        .str_array("tokenizer.ggml.tokens", &refs)
        .i32_array("tokenizer.ggml.token_type", &types)
        .str_array("tokenizer.ggml.merges", &["1 2", "12 3", "123 4"])
        .u32("tokenizer.ggml.bos_token_id", 0)
        .u32("tokenizer.ggml.eos_token_id", 0)
        .bool("tokenizer.ggml.add_bos_token", add_bos);
    if let Some(p) = pre {
        b.str("tokenizer.ggml.pre", p);
    }
    let path = b.write(dir.path(), "bpe.gguf");
    let (tok, info) = tokenizer_of(&path);
    assert_eq!(info.add_bos_token, add_bos);
    let ids = tok
        .encode("12345 <|begin_of_text|>", true)
        .unwrap()
        .get_ids()
        .to_vec();
    ids
}

#[test]
fn byte_level_pre_tokenizers_follow_tokenizer_ggml_pre() {
    // GPT-2's regex keeps the digits together: "1234" + "5".
    assert_eq!(digit_bpe_tokenizer(None, false)[..2], [8, 5]);
    assert_eq!(digit_bpe_tokenizer(Some("gpt2"), false)[..2], [8, 5]);
    // SmolLM splits every digit.
    assert_eq!(
        digit_bpe_tokenizer(Some("smollm"), false)[..5],
        [1, 2, 3, 4, 5]
    );
    // LLaMA-3 splits digits in groups of three: "123" + "45"; and adds BOS.
    assert_eq!(
        digit_bpe_tokenizer(Some("llama-bpe"), true)[..4],
        [0, 7, 4, 5]
    );
    // The control token written in the text is one id.
    assert_eq!(*digit_bpe_tokenizer(None, false).last().unwrap(), 0);
    let dir = tempfile::tempdir().unwrap();
    let mut b = tiny_llama_gguf();
    b.str("tokenizer.ggml.model", "gpt2")
        .str_array("tokenizer.ggml.merges", &[])
        .str("tokenizer.ggml.pre", "deepseek-coder");
    let p = b.write(dir.path(), "x.gguf");
    let e = LlamaGguf::open(&p).err().unwrap();
    assert!(
        e.message().contains("pre-tokenizer 'deepseek-coder'"),
        "{e}"
    );
}

#[test]
fn cli_converts_a_gguf_and_reports_bad_ones_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_llama_gguf().write(dir.path(), "tiny.gguf");
    let out = dir.path().join("tiny.nbl");
    let run = |input: &Path| {
        Command::new(env!("CARGO_BIN_EXE_nibble-tools"))
            .arg("convert")
            .arg(input)
            .arg("-o")
            .arg(&out)
            .args(["--quant", "q8"])
            .output()
            .unwrap()
    };
    let ok = run(&gguf);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("wrote"));
    NblFile::open(&out).unwrap().verify_checksums().unwrap();
    std::fs::remove_file(&out).unwrap();
    let mut b = tiny_llama_gguf();
    b.str("general.architecture", "gemma");
    let bad = b.write(dir.path(), "gemma.gguf");
    let r = run(&bad);
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!("error: {}: architecture 'gemma'", bad.display())),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn non_finite_weights_are_reported_with_their_tensor() {
    let mut b = tiny_llama_gguf();
    let t = b
        .tensors
        .iter_mut()
        .find(|t| t.0 == "blk.1.ffn_down.weight")
        .unwrap();
    t.3[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
    let e = gguf_err(&b);
    assert!(
        e.contains("tensor 'blk.1.ffn_down.weight'") && e.contains("NaN"),
        "{e}"
    );
}

/// Random byte corruption of a small but complete LLaMA GGUF: opening it
/// must succeed or fail with an error, never panic or allocate wildly.
#[test]
fn corrupted_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = tiny_llama_gguf();
    // Keep the file small so many variants run quickly: one layer.
    b.u32("llama.block_count", 1);
    b.tensors.retain(|t| !t.0.starts_with("blk.1."));
    let good = b.bytes();
    let header_len = good.len()
        - b.tensors
            .iter()
            .map(|t| t.3.len().div_ceil(32) * 32)
            .sum::<usize>();
    LlamaGguf::open(&b.write(dir.path(), "good.gguf")).unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let path = dir.path().join("bad.gguf");
    let mut failures = 0;
    for _ in 0..300 {
        let mut bytes = good.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() % header_len as u64) as usize;
            bytes[at] = match next() % 3 {
                0 => next() as u8,
                1 => 0xFF,
                _ => 0,
            };
        }
        std::fs::write(&path, &bytes).unwrap();
        if LlamaGguf::open(&path).is_err() {
            failures += 1;
        }
    }
    // Most corruptions of the header are detected (some land in string
    // contents such as token text, which are valid either way).
    assert!(
        failures > 50,
        "only {failures} of 300 corruptions were rejected"
    );
}

/// Random blocks of `ty` (id, bytes per block, f16 scale offsets) with sane
/// f16 scales, `n` weights in all.
fn random_blocks(
    next: &mut impl FnMut() -> u64,
    block_len: usize,
    block_bytes: usize,
    scales: &[usize],
    n: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(n / block_len * block_bytes);
    for _ in 0..n / block_len {
        let mut blk: Vec<u8> = (0..block_bytes).map(|_| next() as u8).collect();
        for &at in scales {
            let v = ((next() % 2000) as f32 - 1000.0) * 1e-5;
            blk[at..at + 2].copy_from_slice(&f16_bytes(v));
        }
        out.extend(blk);
    }
    out
}

/// Every supported tensor type in one model, through a full conversion: the
/// f32 `.nbl` holds each GGUF tensor decoded, with Q and K rows in HF order
/// (checked by re-applying llama.cpp's permutation).
#[test]
fn every_block_type_converts_through_the_full_path() {
    let (hidden, heads, kv_heads, ffn, vocab) = (256usize, 4usize, 2usize, 512usize, 512usize);
    let hd = hidden / heads;
    let mut b = GgufBuilder::new();
    b.str("general.architecture", "llama")
        .u32("llama.context_length", 128)
        .u32("llama.embedding_length", hidden as u32)
        .u32("llama.block_count", 1)
        .u32("llama.feed_forward_length", ffn as u32)
        .u32("llama.attention.head_count", heads as u32)
        .u32("llama.attention.head_count_kv", kv_heads as u32)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-6);
    tiny_tokenizer_kv(&mut b);
    let mut state = 0x1234_5678_9abc_def1u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    // (gguf name, dims innermost first, stored type)
    use GgmlType as G;
    let specs = [
        ("token_embd.weight", [hidden, vocab], G::Q6K),
        ("blk.0.attn_q.weight", [hidden, hidden], G::Q4K),
        ("blk.0.attn_k.weight", [hidden, kv_heads * hd], G::Q5K),
        ("blk.0.attn_v.weight", [hidden, kv_heads * hd], G::Q6K),
        ("blk.0.attn_output.weight", [hidden, hidden], G::Q4_0),
        ("blk.0.ffn_gate.weight", [hidden, ffn], G::Q4_1),
        ("blk.0.ffn_up.weight", [hidden, ffn], G::Q8_0),
        ("blk.0.ffn_down.weight", [ffn, hidden], G::Bf16),
        ("output.weight", [hidden, vocab], G::F16),
        ("output_norm.weight", [hidden, 1], G::F32),
    ];
    for (name, dims, ty) in specs {
        let n = dims[0] * dims[1];
        // Where each block keeps its f16 scales (ggml-common.h).
        let scales: &[usize] = match ty {
            G::Q4_0 | G::Q8_0 | G::F16 => &[0],
            G::Q4_1 | G::Q4K | G::Q5K => &[0, 2],
            G::Q6K => &[208],
            G::F32 | G::Bf16 => &[],
        };
        let data = match ty {
            G::Bf16 => (0..n)
                .flat_map(|_| {
                    ((((next() % 2000) as f32 - 1000.0) * 1e-4).to_bits() >> 16).to_le_bytes()[..2]
                        .to_vec()
                })
                .collect(),
            G::F32 => (0..n)
                .flat_map(|_| (1.0 + (next() % 100) as f32 * 0.01).to_le_bytes())
                .collect(),
            _ => random_blocks(&mut next, ty.block_len(), ty.block_bytes(), scales, n),
        };
        let dims: Vec<u64> = if dims[1] == 1 {
            vec![dims[0] as u64]
        } else {
            dims.iter().map(|&d| d as u64).collect()
        };
        b.tensor(name, &dims, ty.id(), data);
    }
    for name in ["blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"] {
        b.f32_tensor(name, &[hidden as u64], &vec![1.0; hidden]);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = b.write(dir.path(), "all-types.gguf");
    let out = dir.path().join("all-types.nbl");
    convert(&ConvertOptions::new(&path, &out, QuantPolicy::F32)).unwrap();
    let nbl = NblFile::open(&out).unwrap();
    let model = LlamaGguf::open(&path).unwrap();
    for t in model.file.tensors() {
        let ty = t.ty;
        let cols = t.dims[0] as usize;
        let rows = t.n_elements() as usize / cols;
        let mut gguf_order = vec![0f32; rows * cols];
        dequantize(ty, model.file.bytes(t), &mut gguf_order);
        let hf_name = nibble_tools::gguf::llama::hf_name(&t.name).unwrap().0;
        let stored = nbl_f32(&nbl, &hf_name);
        let heads = match t.name.as_str() {
            "blk.0.attn_q.weight" => Some(heads),
            "blk.0.attn_k.weight" => Some(kv_heads),
            _ => None,
        };
        let reordered = match heads {
            Some(h) => llama_cpp_permute(&stored, rows, cols, h),
            None => stored,
        };
        assert!(gguf_order.iter().all(|x| x.is_finite()), "{}", t.name);
        assert_eq!(reordered, gguf_order, "{} ({ty})", t.name);
    }
}

/// Peak resident memory of this process in bytes (`VmHWM`).
fn peak_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[test]
fn unread_arrays_stay_unparsed() {
    // A 20M-element u8 array under a key nobody reads: parsed, it cost some
    // 32 bytes per element (640 MB); now only its bytes in the map.
    let dir = tempfile::tempdir().unwrap();
    let mut b = tiny_llama_gguf();
    let n = 20_000_000u64;
    let mut p = T_U8.to_le_bytes().to_vec();
    p.extend(n.to_le_bytes());
    p.resize(p.len() + n as usize, 7);
    b.raw("x.junk", T_ARRAY, p);
    let path = b.write(dir.path(), "junk.gguf");
    drop(b);
    // Measured in a process of its own: the other tests of this binary run
    // alongside and share its peak.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "convert_with_junk_array",
            "--ignored",
            "--nocapture",
        ])
        .env("NIBBLE_JUNK_GGUF", &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let grown: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("peak RSS growth: "))
        .expect(&stdout)
        .parse()
        .unwrap();
    assert!(grown < 200 << 20, "peak RSS grew by {grown} bytes");
}

/// The child of [`unread_arrays_stay_unparsed`].
#[test]
#[ignore = "run by unread_arrays_stay_unparsed in a process of its own"]
fn convert_with_junk_array() {
    let path = PathBuf::from(std::env::var_os("NIBBLE_JUNK_GGUF").unwrap());
    let before = peak_rss();
    let f = GgufFile::open(&path).unwrap();
    let MetaValue::Array(a) = f.get("x.junk").unwrap() else {
        panic!("an array")
    };
    let n = a.len();
    assert_eq!(n, 20_000_000);
    let out = path.with_extension("nbl");
    convert(&ConvertOptions::new(&path, &out, QuantPolicy::F32)).unwrap();
    println!("peak RSS growth: {}", peak_rss().saturating_sub(before));
    // Read, the array is what the file says.
    assert_eq!(a.items().len() as u64, n);
    assert_eq!(a.items()[n as usize - 1], MetaValue::U8(7));
}

#[test]
fn absurd_block_count_is_refused_before_planning() {
    let mut b = tiny_llama_gguf();
    b.u32("llama.block_count", u32::MAX);
    let t = std::time::Instant::now();
    let m = gguf_err(&b);
    assert!(t.elapsed().as_secs() < 5);
    assert!(
        m.contains("'llama.block_count' is 4294967295, but the checkpoint has only"),
        "{m}"
    );
}
