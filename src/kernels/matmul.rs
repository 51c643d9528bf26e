//! The matmul driver: activation quantization into reused scratch, row chunks
//! over the thread pool, register tiles inside a chunk. [`matmul_many`] is
//! the one entry: it cuts its list of matrices into runs that share a
//! quantized type once, and each run is one parallel section.

use super::tile::{
    BlockRows, KRows, LanesKernel, Q4Lanes, Q4kTileFn, QTileFn, MAX_TILE, MAX_TILE_T, Q4K_ACT_SUBS,
};
use super::{Isa, QuantAct, QuantAct16, QuantBlocks, QuantizeActFn};
use crate::pool::SharedOut;
use crate::quant::{WeightView, BLOCK};
use half::f16;
use std::cell::RefCell;
use std::thread::LocalKey;

/// The sum of each 32-value activation block, computed once per matmul for
/// the kernels that fold a weight offset into the activations (q4k's
/// `dmin * m`, q4's `-8` in the rows-in-lanes prefill kernels).
pub fn act_block_sums(aq: &[i8], out: &mut Vec<i32>) {
    out.clear();
    out.extend(
        aq.chunks_exact(BLOCK)
            .map(|b| b.iter().map(|&v| v as i32).sum::<i32>()),
    );
}

/// Quantizes rows of `cols` activations with `quantize` (an
/// [`Isa::quantize_act`]), one scale per `group` blocks of each row and one
/// for the row's shorter remainder: `d` holds `nb.div_ceil(group)` scales per
/// row of `nb` blocks.
pub(crate) fn quantize_act_rows(
    quantize: QuantizeActFn,
    x: &[f32],
    cols: usize,
    group: usize,
    qs: &mut [i8],
    d: &mut [f32],
) {
    let nb = cols / BLOCK;
    let per_row = nb.div_ceil(group);
    assert!(
        cols.is_multiple_of(BLOCK)
            && x.len().is_multiple_of(cols)
            && qs.len() == x.len()
            && d.len() == x.len() / cols * per_row,
        "quantize_act_rows: shapes"
    );
    if nb.is_multiple_of(group) {
        return quantize(x, qs, d, group);
    }
    let whole = nb / group * group * BLOCK;
    for ((xr, qr), dr) in x
        .chunks_exact(cols)
        .zip(qs.chunks_exact_mut(cols))
        .zip(d.chunks_exact_mut(per_row))
    {
        let (dw, dt) = dr.split_at_mut(per_row - 1);
        quantize(&xr[..whole], &mut qr[..whole], dw, group);
        quantize(&xr[whole..], &mut qr[whole..], dt, nb % group);
    }
}

thread_local! {
    /// Quantized activations of the current call, reused across calls so the
    /// decode loop does not allocate. Taken out (not borrowed) while in use, so
    /// a nested call on the same thread just gets a fresh buffer.
    static ACT_SCRATCH: RefCell<QuantAct> = RefCell::new(QuantAct::default());
    /// Per-block activation sums ([`act_block_sums`]), reused likewise.
    static OFFSET_SCRATCH: RefCell<Vec<i32>> = const { RefCell::new(Vec::new()) };
    static ACT16_SCRATCH: RefCell<QuantAct16> = RefCell::new(QuantAct16::default());
    /// A q8r row tile's scales repeated per block (see [`QRows::row_scale`]).
    static ROW_SCALE_SCRATCH: RefCell<Vec<f16>> = const { RefCell::new(Vec::new()) };
}

/// An activation block element of the quantized matmul: its quantizer in a
/// kernel set and its scratch buffer.
trait ActElem: Copy + Default + Sync + 'static {
    /// Quantizes rows of `cols` values into `out`, one scale per block, or
    /// per q4k group when `grouped`.
    fn quantize(isa: &Isa, x: &[f32], cols: usize, grouped: bool, out: &mut QuantBlocks<Self>);
    fn scratch() -> &'static LocalKey<RefCell<QuantBlocks<Self>>>;
    /// The activations as 8-bit blocks, for the 4-bit-only [`Q4LanesFn`].
    fn as_act8(act: &QuantBlocks<Self>) -> Option<&QuantAct>;
}

impl ActElem for i8 {
    fn quantize(isa: &Isa, x: &[f32], cols: usize, grouped: bool, out: &mut QuantAct) {
        let group = if grouped { Q4K_ACT_SUBS } else { 1 };
        out.qs.resize(x.len(), 0);
        out.d
            .resize(x.len() / cols * (cols / BLOCK).div_ceil(group), 0.0);
        quantize_act_rows(isa.quantize_act, x, cols, group, &mut out.qs, &mut out.d)
    }
    fn scratch() -> &'static LocalKey<RefCell<QuantAct>> {
        &ACT_SCRATCH
    }
    fn as_act8(act: &QuantAct) -> Option<&QuantAct> {
        Some(act)
    }
}

impl ActElem for i16 {
    fn quantize(isa: &Isa, x: &[f32], _cols: usize, grouped: bool, out: &mut QuantAct16) {
        assert!(!grouped, "16-bit activations have one scale per block");
        out.qs.resize(x.len(), 0);
        out.d.resize(x.len() / BLOCK, 0.0);
        (isa.quantize_act16)(x, &mut out.qs, &mut out.d)
    }
    fn scratch() -> &'static LocalKey<RefCell<QuantAct16>> {
        &ACT16_SCRATCH
    }
    fn as_act8(_: &QuantAct16) -> Option<&QuantAct> {
        None
    }
}

/// The register-tile kernel of a quantized type.
#[derive(Clone, Copy)]
enum Tile<A> {
    /// q8, q4: quants and one f16 scale per block.
    Block(QTileFn<A>),
    /// q4k (8-bit activations only): three planes and activation block sums.
    K(Q4kTileFn),
}

/// Rows of a quantized matrix, as the tile kernels read them.
struct QRows<'a, A> {
    qs: &'a [u8],
    rows: usize,
    /// Quant bytes per row.
    row_bytes: usize,
    /// Block scales (q8, q4), row scales (q8r) or `(d, dmin)` pairs (q4k).
    d: &'a [f16],
    /// Values of `d` per row.
    d_row: usize,
    /// One scale per row (q8r), which the block tile kernels get repeated
    /// per block: one tile's worth, written once per row tile.
    row_scale: bool,
    /// Packed sub-block scales (q4k; empty otherwise).
    sc: &'a [u8],
    /// Bytes of `sc` per row.
    sc_row: usize,
    tile: Tile<A>,
    /// Prefill kernel with rows in lanes (4-bit weights only).
    lanes: Option<Q4Lanes>,
}

/// Below this many multiply-adds a matmul runs on the calling thread: waking
/// the pool costs more than it saves.
const MIN_PARALLEL_MACS: usize = 1 << 17;
/// Multiply-adds per parallel chunk we aim for (big enough to amortize the
/// scheduling, small enough to balance).
const TARGET_CHUNK_MACS: usize = 1 << 20;

/// An f32 or f16 matrix: one dot product per (row, token) in f32.
fn float_matmul(isa: &Isa, w: &WeightView, x: &[f32], n_tokens: usize, y: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    if rows == 0 {
        return;
    }
    match *w {
        WeightView::F32 { data, .. } => {
            let dot = isa.dot_f32;
            float_rows(rows, cols, n_tokens, y, &|r, t| {
                dot(
                    &data[r * cols..(r + 1) * cols],
                    &x[t * cols..(t + 1) * cols],
                )
            })
        }
        WeightView::F16 { data, .. } => {
            let dot = isa.dot_f16;
            float_rows(rows, cols, n_tokens, y, &|r, t| {
                dot(
                    &data[r * cols..(r + 1) * cols],
                    &x[t * cols..(t + 1) * cols],
                )
            })
        }
        _ => unreachable!("float_matmul: quantized matrix"),
    }
}

/// Most matrices one [`matmul_many`] section fuses; longer lists are split.
const MAX_FUSED: usize = 3;

/// Rows of a quantized matrix with 8-bit weights (q8, q8r), for the tile
/// kernels.
fn q8_rows<'a>(isa: &Isa, w: &WeightView<'a>) -> Option<QRows<'a, i16>> {
    let (qs, d, rows, cols, row_scale) = match *w {
        WeightView::Q8 { qs, d, rows, cols } => (qs, d, rows, cols, false),
        WeightView::Q8R { qs, d, rows, cols } => (qs, d, rows, cols, true),
        _ => return None,
    };
    Some(QRows {
        qs: bytemuck::cast_slice(qs),
        rows,
        row_bytes: cols,
        d,
        d_row: if row_scale { 1 } else { cols / BLOCK },
        row_scale,
        sc: &[],
        sc_row: 0,
        tile: Tile::Block(isa.q8_tile),
        lanes: None,
    })
}

/// Rows of a quantized matrix with 4-bit weights (q4, q4k), for the tile
/// kernels.
fn q4_rows<'a>(isa: &Isa, w: &WeightView<'a>) -> Option<QRows<'a, i8>> {
    match *w {
        WeightView::Q4 { qs, d, rows, cols } => Some(QRows {
            qs,
            rows,
            row_bytes: cols / 2,
            d,
            d_row: cols / BLOCK,
            row_scale: false,
            sc: &[],
            sc_row: 0,
            tile: Tile::Block(isa.q4_tile),
            lanes: isa.q4_lanes,
        }),
        WeightView::Q4K {
            qs,
            dm,
            sc,
            rows,
            cols,
        } => {
            let [row_bytes, dm_bytes, sc_row] = w.tensor_type().row_planes(cols);
            Some(QRows {
                qs,
                rows,
                row_bytes,
                d: dm,
                d_row: dm_bytes / 2,
                row_scale: false,
                sc,
                sc_row,
                tile: Tile::K(isa.q4k_tile),
                lanes: isa.q4k_lanes,
            })
        }
        _ => None,
    }
}

fn quantized(w: &WeightView) -> bool {
    !matches!(w, WeightView::F32 { .. } | WeightView::F16 { .. })
}

/// `outs[i].1 = outs[i].0 · x` (shapes checked by the caller): each run of up
/// to [`MAX_FUSED`] neighbours that share a quantized type and width (e.g. q
/// and k when v has more bits) is one [`quant_matmul`], every other matrix
/// one [`float_matmul`]. A single matrix is a list of one.
pub(super) fn matmul_many(
    isa: &Isa,
    x: &[f32],
    n_tokens: usize,
    outs: &mut [(&WeightView, &mut [f32])],
) {
    if n_tokens == 0 {
        return;
    }
    let mut rest = outs;
    while !rest.is_empty() {
        let head = rest[0].0;
        if !quantized(head) {
            let (one, tail) = rest.split_at_mut(1);
            float_matmul(isa, head, x, n_tokens, one[0].1);
            rest = tail;
            continue;
        }
        let same = rest
            .iter()
            .take(MAX_FUSED)
            .take_while(|(w, _)| {
                quantized(w) && w.tensor_type() == head.tensor_type() && w.cols() == head.cols()
            })
            .count();
        let (run, tail) = rest.split_at_mut(same);
        quant_run(isa, x, n_tokens, run);
        rest = tail;
    }
}

/// One fused run of [`matmul_many`]: matrices of one quantized type and width.
fn quant_run(isa: &Isa, x: &[f32], n_tokens: usize, outs: &mut [(&WeightView, &mut [f32])]) {
    let cols = outs[0].0.cols();
    let n = outs.len();
    let mut ys: [&mut [f32]; MAX_FUSED] = Default::default();
    if matches!(outs[0].0, WeightView::Q8 { .. } | WeightView::Q8R { .. }) {
        let mut ws: [Option<QRows<i16>>; MAX_FUSED] = Default::default();
        for (i, (w, y)) in outs.iter_mut().enumerate() {
            ws[i] = q8_rows(isa, w);
            ys[i] = &mut **y;
        }
        quant_matmul(isa, &ws[..n], cols, x, n_tokens, &mut ys[..n])
    } else {
        let mut ws: [Option<QRows<i8>>; MAX_FUSED] = Default::default();
        for (i, (w, y)) in outs.iter_mut().enumerate() {
            ws[i] = q4_rows(isa, w);
            ys[i] = &mut **y;
        }
        quant_matmul(isa, &ws[..n], cols, x, n_tokens, &mut ys[..n])
    }
}

/// Number of parallel chunks for `rows` rows of `macs_per_row` work each,
/// and the chunk size in rows (a multiple of `align`).
fn chunking(rows: usize, macs_per_row: usize, align: usize) -> (usize, usize) {
    let total = rows.saturating_mul(macs_per_row);
    let threads = crate::pool::global().threads();
    if threads <= 1 || total < MIN_PARALLEL_MACS {
        return (1, rows);
    }
    let want = (total / TARGET_CHUNK_MACS).clamp(threads, threads * 8);
    // round the chunk count to a multiple of the thread count so the last
    // wave is not one thread working alone
    let want = want.div_ceil(threads) * threads;
    let chunk = rows.div_ceil(want).div_ceil(align) * align;
    (rows.div_ceil(chunk), chunk)
}

/// The quantized matmul of one or more matrices (`ws[i]`, all with `cols`
/// columns) against the same activations, writing `ys[i]`: activations
/// quantized once, then the row chunks of every matrix in one parallel
/// section. (`ws` entries are all `Some`; `Option` only lets the caller fill
/// a fixed array.)
fn quant_matmul<A: ActElem>(
    isa: &Isa,
    ws: &[Option<QRows<A>>],
    cols: usize,
    x: &[f32],
    n_tokens: usize,
    ys: &mut [&mut [f32]],
) {
    assert!(
        cols.is_multiple_of(BLOCK),
        "matmul: cols not a multiple of the block"
    );
    assert!(!ws.is_empty() && ws.len() == ys.len() && ws.len() <= MAX_FUSED);
    let nb = cols / BLOCK;
    let ws: [&QRows<A>; MAX_FUSED] =
        std::array::from_fn(|i| ws[i.min(ws.len() - 1)].as_ref().expect("matmul: matrix"));
    let ws = &ws[..ys.len()];
    for (w, y) in ws.iter().zip(ys.iter()) {
        assert!(
            w.qs.len() >= w.rows * w.row_bytes
                && w.d.len() >= w.rows * w.d_row
                && w.sc.len() >= w.rows * w.sc_row
        );
        assert_eq!(y.len(), w.rows * n_tokens, "matmul: output shape");
    }
    let mut act = A::scratch().with(|s| std::mem::take(&mut *s.borrow_mut()));
    let q4k = matches!(ws[0].tile, Tile::K(_));
    A::quantize(isa, x, cols, q4k, &mut act);

    let lanes = ws[0].lanes.filter(|_| n_tokens > 1).zip(A::as_act8(&act));
    let mut asum = OFFSET_SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if lanes.is_some() || q4k {
        let act8 = A::as_act8(&act).expect("block sums are of 8-bit activations");
        act_block_sums(&act8.qs, &mut asum);
    }
    let align = lanes.map_or(isa.tile_rows, |(l, _)| l.rows);
    // the chunks of matrix i are tasks first[i]..first[i + 1]
    let mut first = [0usize; MAX_FUSED + 1];
    let mut chunk = [0usize; MAX_FUSED];
    for (i, w) in ws.iter().enumerate() {
        let (n_chunks, c) = chunking(w.rows, cols * n_tokens, align);
        chunk[i] = c;
        first[i + 1] = first[i] + n_chunks;
    }
    // each chunk writes only its rows of its matrix's output
    let outs: [SharedOut; MAX_FUSED] =
        std::array::from_fn(|i| ys.get_mut(i).map_or(SharedOut::NONE, |y| SharedOut::new(y)));
    let run = |task: usize| {
        let i = (0..ws.len())
            .rfind(|&i| first[i] <= task)
            .expect("task in range");
        let (w, out) = (ws[i], outs[i]);
        let r0 = (task - first[i]) * chunk[i];
        let r1 = (r0 + chunk[i]).min(w.rows);
        let mut r = r0;
        if let Some((lanes, act8)) = lanes {
            r = q4_lanes_range(lanes, w, nb, r0..r1, w.rows, act8, &asum, n_tokens, out);
        }
        quant_rows(isa, w, nb, r..r1, w.rows, &act, &asum, n_tokens, out);
    };
    let tasks = first[ws.len()];
    if tasks == 1 {
        run(0)
    } else {
        crate::pool::global().run(tasks, &run);
    }
    OFFSET_SCRATCH.with(|s| *s.borrow_mut() = asum);
    A::scratch().with(|s| *s.borrow_mut() = act);
}

/// Computes rows `range` for all tokens, tile by tile: for each group of
/// `tile_rows` weight rows, every token tile runs against the same weight
/// bytes (which stay in L1/L2), so each weight block is unpacked once per
/// token tile rather than once per token.
#[allow(clippy::too_many_arguments)]
fn quant_rows<A: ActElem>(
    isa: &Isa,
    w: &QRows<A>,
    nb: usize,
    range: std::ops::Range<usize>,
    rows: usize,
    act: &QuantBlocks<A>,
    asum: &[i32],
    n_tokens: usize,
    out: SharedOut,
) {
    let (tr, tt) = if n_tokens == 1 {
        (isa.tile_rows, 1)
    } else {
        (isa.tile_rows, isa.tile_tokens)
    };
    let cols = nb * BLOCK;
    let mut tile = [0f32; MAX_TILE];
    let mut repeated = ROW_SCALE_SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let mut r0 = range.start;
    while r0 < range.end {
        let nr = tr.min(range.end - r0);
        let wq = &w.qs[r0 * w.row_bytes..(r0 + nr) * w.row_bytes];
        let mut wd = &w.d[r0 * w.d_row..(r0 + nr) * w.d_row];
        if w.row_scale {
            repeated.clear();
            for &d in wd {
                repeated.extend(std::iter::repeat_n(d, nb));
            }
            wd = &repeated;
        }
        let mut t0 = 0;
        while t0 < n_tokens {
            let nt = tt.min(n_tokens - t0);
            // one scale per block, or per group for q4k
            let ds = act.d.len() / n_tokens;
            let ad = &act.d[t0 * ds..(t0 + nt) * ds];
            match w.tile {
                Tile::Block(f) => {
                    let aq = &act.qs[t0 * cols..(t0 + nt) * cols];
                    f(BlockRows { qs: wq, d: wd }, aq, ad, nb, nr, nt, &mut tile)
                }
                Tile::K(f) => {
                    let act8 = A::as_act8(act).expect("q4k multiplies 8-bit activations");
                    let k = KRows {
                        qs: wq,
                        dm: wd,
                        sc: &w.sc[r0 * w.sc_row..(r0 + nr) * w.sc_row],
                    };
                    let aq = &act8.qs[t0 * cols..(t0 + nt) * cols];
                    let asum = &asum[t0 * nb..(t0 + nt) * nb];
                    f(k, aq, ad, asum, nb, nr, nt, &mut tile)
                }
            }
            for t in 0..nt {
                for r in 0..nr {
                    let idx = (t0 + t) * rows + r0 + r;
                    // SAFETY: idx < n_tokens * rows == y.len() (checked by the
                    // caller), and row r0 + r lies in this chunk's range, which
                    // no other chunk writes.
                    unsafe { out.write(idx, tile[r * MAX_TILE_T + t]) };
                }
            }
            t0 += nt;
        }
        r0 += nr;
    }
    ROW_SCALE_SCRATCH.with(|s| *s.borrow_mut() = repeated);
}

/// Computes the whole groups of `lanes.rows` rows at the start of `range`
/// with the rows-in-lanes kernel; returns the first row left for the row tiles.
#[allow(clippy::too_many_arguments)]
fn q4_lanes_range<A>(
    lanes: Q4Lanes,
    w: &QRows<A>,
    nb: usize,
    range: std::ops::Range<usize>,
    rows: usize,
    act: &QuantAct,
    asum: &[i32],
    n_tokens: usize,
    out: SharedOut,
) -> usize {
    let cols = nb * BLOCK;
    let mut tile = [0f32; MAX_TILE];
    let mut r0 = range.start;
    let n = lanes.rows;
    while r0 + n <= range.end {
        let wq = &w.qs[r0 * w.row_bytes..(r0 + n) * w.row_bytes];
        let wd = &w.d[r0 * w.d_row..(r0 + n) * w.d_row];
        let mut t0 = 0;
        while t0 < n_tokens {
            let nt = lanes.tokens.min(n_tokens - t0);
            let ds = act.d.len() / n_tokens;
            let (aq, ad) = (
                &act.qs[t0 * cols..(t0 + nt) * cols],
                &act.d[t0 * ds..(t0 + nt) * ds],
            );
            let asum = &asum[t0 * nb..(t0 + nt) * nb];
            match lanes.kernel {
                LanesKernel::Q4(f) => {
                    let q = BlockRows { qs: wq, d: wd };
                    f(q, w.row_bytes, nb, aq, ad, asum, nt, &mut tile)
                }
                LanesKernel::Q4K(f) => {
                    let k = KRows {
                        qs: wq,
                        dm: wd,
                        sc: &w.sc[r0 * w.sc_row..(r0 + n) * w.sc_row],
                    };
                    f(k, nb, aq, ad, asum, nt, &mut tile)
                }
            }
            for t in 0..nt {
                for r in 0..n {
                    // SAFETY: as in `quant_rows`: in bounds, and row r0 + r
                    // belongs to this chunk only.
                    unsafe { out.write((t0 + t) * rows + r0 + r, tile[r * MAX_TILE_T + t]) };
                }
            }
            t0 += nt;
        }
        r0 += n;
    }
    r0
}

/// f32/f16 weights: one dot product per (row, token), rows split across the pool.
fn float_rows(
    rows: usize,
    cols: usize,
    n_tokens: usize,
    y: &mut [f32],
    dot: &(dyn Fn(usize, usize) -> f32 + Sync),
) {
    let (n_chunks, chunk) = chunking(rows, cols * n_tokens, 1);
    let out = SharedOut::new(y);
    let run = |c: usize| {
        let r0 = c * chunk;
        for r in r0..(r0 + chunk).min(rows) {
            for t in 0..n_tokens {
                // SAFETY: as in `quant_rows`: in bounds, and row r belongs to
                // this chunk only.
                unsafe { out.write(t * rows + r, dot(r, t)) };
            }
        }
    };
    if n_chunks == 1 {
        run(0)
    } else {
        crate::pool::global().run(n_chunks, &run);
    }
}
