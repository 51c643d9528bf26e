//! Kernel throughput on 7B-sized matrices, per kernel set this CPU runs:
//! decode (one token, matrix-vector) and prefill (64 tokens, tiled) for q4 and
//! q8 weights, and one head's attention over 512 cached positions.
//! Throughput is reported in bytes of weights streamed per second;
//! GFLOP/s = 2 * rows * cols * tokens / time (see benches/RESULTS.md).
//!
//! `cargo bench --bench kernels [-- FILTER]`; `NIBBLE_BENCH_SETS=avx2,scalar`
//! limits the sets, the global rayon pool size (`RAYON_NUM_THREADS`) the threads.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nibble::kernels::{KernelSet, Kernels};
use nibble::quant::{encode_matrix, TensorType, WeightView};
use std::time::Duration;

const SHAPES: [(usize, usize); 3] = [(4096, 4096), (11008, 4096), (4096, 11008)];
const PREFILL_TOKENS: usize = 64;

fn pseudo_random(n: usize, mut seed: u32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

fn sets() -> Vec<Kernels> {
    let only = std::env::var("NIBBLE_BENCH_SETS").ok();
    KernelSet::available()
        .into_iter()
        .filter(|s| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|n| n == s.name()))
        })
        .map(|s| Kernels::new(s).unwrap())
        .collect()
}

fn bench(c: &mut Criterion) {
    let sets = sets();
    for (rows, cols) in SHAPES {
        let wf = pseudo_random(rows * cols, 0x1234_5678 ^ rows as u32);
        let x = pseudo_random(PREFILL_TOKENS * cols, 0x9876_5432);
        for ty in [TensorType::Q4, TensorType::Q4K, TensorType::Q8] {
            if !cols.is_multiple_of(ty.cols_multiple()) {
                continue;
            }
            let bytes = encode_matrix(ty, cols, &wf).unwrap();
            let w = WeightView::from_bytes(ty, rows, cols, &bytes).unwrap();
            for (label, n) in [("matvec", 1), ("prefill64", PREFILL_TOKENS)] {
                let mut g = c.benchmark_group(format!("{label}/{ty}/{rows}x{cols}"));
                g.sample_size(10)
                    .warm_up_time(Duration::from_millis(500))
                    .measurement_time(Duration::from_secs(2))
                    .throughput(Throughput::Bytes(bytes.len() as u64));
                let mut y = vec![0f32; rows * n];
                for k in &sets {
                    // the scalar set's prefill takes seconds per iteration and
                    // says nothing new
                    if n > 1 && k.set() == KernelSet::Scalar {
                        continue;
                    }
                    g.bench_function(BenchmarkId::from_parameter(k.set()), |b| {
                        b.iter(|| k.matmul(&w, &x[..n * cols], n, &mut y))
                    });
                }
                g.finish();
            }
        }
    }
}

/// One query head attending over `len` cached f16 positions (the inner loop
/// of attention at depth, and of every prefill token): SmolLM2's head size
/// 64 and LLaMA-2's 128. Throughput in bytes of keys and values read.
fn bench_attention(c: &mut Criterion) {
    let sets = sets();
    for hd in [64, 128] {
        let len = 512;
        let to_f16 =
            |v: Vec<f32>| -> Vec<half::f16> { v.into_iter().map(half::f16::from_f32).collect() };
        let keys = to_f16(pseudo_random(len * hd, 0x5151_0001));
        let values = to_f16(pseudo_random(len * hd, 0x5151_0002));
        let q = pseudo_random(hd, 0x5151_0003);
        let mut g = c.benchmark_group(format!("attend_f16/hd{hd}/len{len}"));
        g.sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .throughput(Throughput::Bytes((4 * len * hd) as u64));
        let (mut scores, mut out) = (vec![0f32; len], vec![0f32; hd]);
        for k in &sets {
            g.bench_function(BenchmarkId::from_parameter(k.set()), |b| {
                b.iter(|| k.attend_f16(&q, &keys, &values, 0.125, &mut scores, &mut out))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench, bench_attention);
criterion_main!(benches);
