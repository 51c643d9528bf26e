//! Kernel throughput on 7B-sized matrices, per kernel set this CPU runs:
//! decode (one token, matrix-vector) and prefill (64 tokens, tiled) for q4 and
//! q8 weights. Throughput is reported in bytes of weights streamed per second;
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

criterion_group!(benches, bench);
criterion_main!(benches);
