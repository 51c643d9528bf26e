//! `perplexity_kl`: llama.cpp `--kl-divergence` statistics between two
//! conversions of the same tiny checkpoint.

mod common;

use nibble::perplexity::{perplexity, perplexity_kl};
use nibble::Model;

fn text() -> String {
    let t = std::fs::read_to_string(common::fixtures().join("eval-text.txt")).unwrap();
    t.chars().take(6000).collect()
}

#[test]
fn a_model_against_itself_has_zero_kl_and_full_agreement() {
    let m = Model::open(common::tiny_nbl("tiny-mha", "q4")).unwrap();
    let r = perplexity_kl(&m, &m, &text(), 64, |_, _, _| {}).unwrap();
    assert!(r.model.tokens_scored > 100, "{}", r.model.tokens_scored);
    assert_eq!(r.kl_mean, 0.0);
    assert_eq!(r.kl_p99, 0.0);
    assert_eq!(r.top1_agreement, 1.0);
    assert_eq!(r.model.perplexity, r.base.perplexity);
}

#[test]
fn a_different_quantization_diverges_and_perplexities_match_the_plain_run() {
    let base = Model::open(common::tiny_nbl("tiny-mha", "f32")).unwrap();
    let q4 = Model::open(common::tiny_nbl("tiny-mha", "q4")).unwrap();
    let text = text();
    let r = perplexity_kl(&q4, &base, &text, 64, |_, _, _| {}).unwrap();
    assert!(r.kl_mean > 0.0 && r.kl_mean.is_finite(), "{}", r.kl_mean);
    assert!(
        r.kl_p99 >= r.kl_mean,
        "p99 {} < mean {}",
        r.kl_p99,
        r.kl_mean
    );
    // A fraction of the scored tokens: a whole number of them.
    let agreeing = r.top1_agreement * r.model.tokens_scored as f64;
    assert!(
        (agreeing - agreeing.round()).abs() < 1e-6 && (0.0..=1.0).contains(&r.top1_agreement),
        "top-1 agreement {} of {} tokens",
        r.top1_agreement,
        r.model.tokens_scored
    );
    // The same windows as `perplexity` scores, for both models.
    let plain_q4 = perplexity(&q4, &text, 64, |_, _, _| {}).unwrap();
    let plain_base = perplexity(&base, &text, 64, |_, _, _| {}).unwrap();
    assert_eq!(r.model.tokens_scored, plain_q4.tokens_scored);
    assert!((r.model.perplexity / plain_q4.perplexity - 1.0).abs() < 1e-9);
    assert!((r.base.perplexity / plain_base.perplexity - 1.0).abs() < 1e-9);
    // 4-bit is further from f32 than 8-bit.
    let q8 = Model::open(common::tiny_nbl("tiny-mha", "q8")).unwrap();
    let r8 = perplexity_kl(&q8, &base, &text, 64, |_, _, _| {}).unwrap();
    eprintln!(
        "tiny-mha vs f32: q8 KL mean {:.3e} p99 {:.3e} top-1 {:.4}; q4 KL mean {:.3e} top-1 {:.4}",
        r8.kl_mean, r8.kl_p99, r8.top1_agreement, r.kl_mean, r.top1_agreement
    );
    assert!(
        r8.kl_mean < r.kl_mean,
        "q8 {} vs q4 {}",
        r8.kl_mean,
        r.kl_mean
    );
    assert!(
        r8.top1_agreement > r.top1_agreement,
        "top-1 agreement: q8 {} vs q4 {}",
        r8.top1_agreement,
        r.top1_agreement
    );
    // Just above / below what q8 (16-bit activations) measures here: KL mean
    // 1.37e-3, top-1 94.7% (8-bit activations gave 2.32e-3 and 93.3%).
    assert!(r8.kl_mean < 1.5e-3, "q8 KL mean {}", r8.kl_mean);
    assert!(r8.top1_agreement > 0.94, "q8 top-1 {}", r8.top1_agreement);
}
