//! Converts the real SmolLM2-135M-Instruct checkpoint (tied embeddings,
//! grouped-query attention, a separate chat_template.jinja, no BOS added).
//! The checkpoint is built by `../shared/models/smollm2-135m/make.sh` into
//! `target/models/smollm2-f32` (shared with the root crate's tests).

mod common;

use nibble::format::{keys, names, NblFile};
use nibble::quant::TensorType;
use nibble_tools::convert::{convert, ConvertOptions, QuantPolicy};
use safetensors::SafeTensors;

#[test]
fn smollm2_converts_with_tied_embeddings_and_its_chat_template() {
    if !common::have_shared() {
        return;
    }
    let dir = common::smollm2_checkpoint();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2-q4.nbl");
    let summary = convert(&ConvertOptions::new(&dir, &out, QuantPolicy::Q4)).unwrap();
    assert_eq!(summary.tensors, 272);
    let file = NblFile::open(&out).unwrap();
    file.verify_checksums().unwrap();

    let m = file.metadata();
    assert_eq!(m.get_uint(keys::VOCAB_SIZE).unwrap(), Some(49152));
    assert_eq!(m.get_uint(keys::NUM_HEADS).unwrap(), Some(9));
    assert_eq!(m.get_uint(keys::NUM_KV_HEADS).unwrap(), Some(3));
    assert_eq!(m.get_uint(keys::HEAD_DIM).unwrap(), Some(64));
    assert_eq!(m.get_uint(keys::CONTEXT_LENGTH).unwrap(), Some(8192));
    assert_eq!(m.get_f32(keys::ROPE_THETA).unwrap(), Some(100000.0));
    assert_eq!(m.get_bool(keys::TIE_WORD_EMBEDDINGS).unwrap(), Some(true));
    assert_eq!(m.get_uint(keys::BOS_TOKEN_ID).unwrap(), Some(1));
    assert_eq!(
        m.get_u32_array(keys::EOS_TOKEN_IDS).unwrap(),
        Some(&[2u32][..])
    );
    assert_eq!(m.get_str(keys::BOS_TOKEN).unwrap(), Some("<|im_start|>"));
    assert_eq!(m.get_str(keys::EOS_TOKEN).unwrap(), Some("<|im_end|>"));
    assert_eq!(m.get_bool(keys::ADD_BOS_TOKEN).unwrap(), Some(false));
    let jinja = std::fs::read_to_string(dir.join("chat_template.jinja")).unwrap();
    assert_eq!(
        m.get_str(keys::CHAT_TEMPLATE).unwrap(),
        Some(jinja.as_str())
    );

    // Tied: no lm_head, and the embedding (the output projection) is q8r.
    assert!(file.tensor(names::OUTPUT).is_none());
    let emb = file.require(names::TOKEN_EMBEDDING).unwrap();
    assert_eq!(emb.info.tensor_type, Some(TensorType::Q8R));
    assert_eq!(
        file.require("model.layers.29.mlp.down_proj.weight")
            .unwrap()
            .info
            .tensor_type,
        Some(TensorType::Q4)
    );

    // The embedding rows decode to the source within half a q8r step (the
    // row's largest magnitude / 127).
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let src = st.tensor(names::TOKEN_EMBEDDING).unwrap();
    let src: Vec<f32> = src
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let w = emb.matrix().unwrap();
    let mut row = vec![0f32; w.cols()];
    for r in [0, 1, 2, 1000, 49151] {
        w.dequantize_row(r, &mut row);
        let want = &src[r * w.cols()..(r + 1) * w.cols()];
        let amax = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (g, x) in row.iter().zip(want) {
            assert!(
                (g - x).abs() <= amax / 254.0 * (1.0 + 2f32.powi(-10)),
                "row {r}: {x} decoded as {g}"
            );
        }
    }
}
