//! One sequence's state: the KV cache and the scratch buffers of the forward
//! pass, all allocated when the session is created.

use super::memory::{self, MemoryLimit, SessionMemory};
use super::stats::{add_squares, ActivationStats, LayerSums};
use super::{Config, LayerWeights, Model, RopeScaling, Weights};
use crate::error::{Error, Result};
use crate::kernels;
use half::{f16, slice::HalfFloatSliceExt};

/// Most tokens pushed through the layers at once. Longer inputs are split, so
/// scratch memory stays bounded while prompt processing still hands the
/// kernels whole matrices of activations.
pub const MAX_BATCH: usize = 512;

/// How a [`Session`] is set up.
#[derive(Clone, Debug, Default)]
pub struct SessionOptions {
    /// Context length in tokens; `None` = the model's own.
    pub ctx: Option<usize>,
    /// Element type of the KV cache.
    pub kv_type: KvType,
    /// Bytes the session may allocate (KV cache, RoPE tables, scratch;
    /// the mapped model file is not counted). `None` = the process-wide
    /// limit of [`super::set_memory_limit`], else the memory the OS reports
    /// available. A context that does not fit is refused with
    /// [`Error::OutOfMemory`]; the model's own context (`ctx: None`) is
    /// shortened instead, to fit in seven eighths of it.
    pub max_memory: Option<u64>,
    /// Most rows of logits one forward call returns (counted in the memory
    /// check; 0 = 1). Perplexity asks for half a window.
    pub logits_rows: usize,
}

impl SessionOptions {
    /// A context of `ctx` tokens, everything else default.
    pub fn with_ctx(ctx: usize) -> Self {
        Self {
            ctx: Some(ctx),
            ..Self::default()
        }
    }
}

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    /// Half the memory; rounding keys and values to f16 moves logits by
    /// about 1e-4 relative, invisible in generation.
    #[default]
    F16,
    /// Exact: for comparing against f32 references.
    F32,
}

/// Cached keys or values, `[layer][kv_head][position][head_dim]`. f16 is kept
/// as `u16` bits: `vec![0u16; n]` is a zeroed allocation the OS maps lazily,
/// so pages of positions never reached never become resident.
enum KvStore {
    F16(Vec<u16>),
    F32(Vec<f32>),
}

impl KvStore {
    fn new(ty: KvType, len: usize) -> Self {
        match ty {
            KvType::F16 => Self::F16(vec![0u16; len]),
            KvType::F32 => Self::F32(vec![0f32; len]),
        }
    }
}

/// What attention needs from a cache element type.
trait KvElem: Copy + Send + Sync + 'static {
    fn from_f32(x: f32) -> Self;
    /// Cached rows as f32: borrowed when they already are, else widened into
    /// `scratch` (for prefill, which reads every row once per query).
    fn rows_f32<'a>(rows: &'a [Self], scratch: &'a mut Vec<f32>) -> &'a [f32];
    /// One head's attention, see [`attend`].
    fn attend(
        q: &[f32],
        keys: &[Self],
        values: &[Self],
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    );
}

impl KvElem for f16 {
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn rows_f32<'a>(rows: &'a [Self], scratch: &'a mut Vec<f32>) -> &'a [f32] {
        scratch.resize(rows.len(), 0.0);
        // F16C where the CPU has it (detected by `half`)
        rows.convert_to_f32_slice(scratch);
        scratch
    }
    /// The kernel set's fused attention: scores, softmax and the weighted
    /// sum of values in one pass per head, `out` held in registers.
    fn attend(
        q: &[f32],
        keys: &[Self],
        values: &[Self],
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        kernels::attend_f16(q, keys, values, scale, scores, out)
    }
}

impl KvElem for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
    fn rows_f32<'a>(rows: &'a [Self], _scratch: &'a mut Vec<f32>) -> &'a [f32] {
        rows
    }
    fn attend(
        q: &[f32],
        keys: &[Self],
        values: &[Self],
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        kernels::attend_f32(q, keys, values, scale, scores, out)
    }
}

/// Per-batch activations, sized for [`MAX_BATCH`] tokens on first use.
#[derive(Default)]
struct Scratch {
    /// Residual stream `[n, hidden]`.
    x: Vec<f32>,
    /// Normalized input of the current block `[n, hidden]`.
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output, heads concatenated `[n, q_dim]`.
    att: Vec<f32>,
    /// Output of o_proj / down_proj `[n, hidden]`.
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// One KV head's cached keys and values widened to f32 for a prefill
    /// batch (f16 cache only), `[positions, head_dim]` each; grown on demand.
    wide_k: Vec<f32>,
    wide_v: Vec<f32>,
}

/// The context a [`Session`] gets, decided before anything is allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContextPlan {
    /// Context length in tokens.
    pub ctx: usize,
    /// The model's own context, when it did not fit and `ctx` is shorter.
    pub capped_from: Option<usize>,
    /// What the session can grow to.
    pub memory: SessionMemory,
    /// What it was checked against.
    pub limit: Option<MemoryLimit>,
}

impl ContextPlan {
    /// The context `opts` asks for on `model` (the model's own, shortened to
    /// fit the memory limit, when `opts.ctx` is `None`), checked against the
    /// memory limit: [`Error::OutOfMemory`] when it does not fit.
    pub fn new(model: &Model, opts: &SessionOptions) -> Result<Self> {
        let c = model.config();
        let threads = crate::pool::global().threads();
        let rows = opts.logits_rows;
        let need = |ctx| memory::session_memory(c, ctx, opts.kv_type, threads, rows);
        let limit = memory::limit(opts.max_memory);
        let mut ctx = opts.ctx.unwrap_or(c.context_length);
        if ctx == 0 {
            return Err(Error::InvalidArgument(
                "the context length must be at least 1".into(),
            ));
        }
        let mut capped_from = None;
        if let (None, Some(l)) = (opts.ctx, limit) {
            if need(ctx).total > l.bytes() {
                // An eighth to spare: for the rest of the process, and so
                // the same context still fits when checked again a moment
                // later against a slightly different MemAvailable.
                let room = l.bytes() - l.bytes() / 8;
                let fit = memory::max_ctx(c, opts.kv_type, threads, rows, room, ctx);
                // Round to a multiple of 256 tokens when that leaves any.
                let fit = if fit >= 256 { fit / 256 * 256 } else { fit };
                if fit > 0 {
                    capped_from = Some(ctx);
                    ctx = fit;
                }
            }
        }
        let mem = need(ctx);
        // Also what the allocator and slice indexing can address at all.
        let addressable = (isize::MAX as u64) / 2;
        let available = limit.map_or(addressable, |l| l.bytes().min(addressable));
        if mem.total > available {
            return Err(Error::OutOfMemory {
                path: model.path().to_owned(),
                ctx,
                needed: mem.total,
                kv_cache: mem.kv_cache,
                limit: limit.unwrap_or(MemoryLimit::Limit(addressable)),
            });
        }
        Ok(Self {
            ctx,
            capped_from,
            memory: mem,
            limit,
        })
    }
}

/// A sequence being processed: tokens go in, logits come out, keys and values
/// of every processed position stay in the cache.
///
/// ```
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("model.nbl");
/// # let tiny = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny/tiny-mha");
/// # nibble_tools::convert::convert(&nibble_tools::convert::ConvertOptions::new(
/// #     tiny, &path, nibble_tools::convert::QuantPolicy::F32))?;
/// use nibble::{Model, Session, SessionOptions};
///
/// let model = Model::open(&path)?;
/// let mut session = Session::new(&model, SessionOptions::with_ctx(64))?;
/// let vocab = model.config().vocab_size;
/// // Logits predicting the token after [1, 42, 7]...
/// let next = nibble::sampler::argmax(session.forward(&[1, 42, 7])?);
/// assert_eq!(session.len(), 3);
/// // ...and one more token reuses the cached keys and values.
/// assert_eq!(session.forward(&[next])?.len(), vocab);
/// assert_eq!(session.tokens(), &[1, 42, 7, next]);
/// // Past the context: an error, not a crash.
/// assert!(session.forward(&[0; 61]).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Session<'m> {
    model: &'m Model,
    plan: ContextPlan,
    w: Weights<'m>,
    ctx: usize,
    /// Tokens whose keys and values are in the cache, in order.
    tokens: Vec<u32>,
    /// Each head's keys (values) are contiguous, so attention streams them.
    k_cache: KvStore,
    v_cache: KvStore,
    /// `cos`/`sin` of every position reached and frequency,
    /// `[position][head_dim / 2]`, extended as positions are first reached
    /// (a context of millions of tokens costs nothing until used).
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    s: Scratch,
    logits: Vec<f32>,
    /// Matrix-input statistics, while collecting.
    stats: Option<Box<ActivationStats>>,
}

impl<'m> Session<'m> {
    /// A new empty sequence over `model`, its KV cache allocated for the
    /// whole context (`opts.ctx`, by default the model's own).
    ///
    /// The whole memory the session can grow to is checked first (see
    /// [`ContextPlan::new`]): a context that does not fit is
    /// [`Error::OutOfMemory`], never an aborted allocation.
    pub fn new(model: &'m Model, opts: SessionOptions) -> Result<Self> {
        let c = model.config();
        let plan = ContextPlan::new(model, &opts)?;
        let ctx = plan.ctx;
        // Fits: the plan counted it, with room to spare in isize.
        let cache_len = c.num_layers * ctx * c.kv_dim();
        Ok(Self {
            plan,
            model,
            w: model.weights()?,
            ctx,
            tokens: Vec::new(),
            k_cache: KvStore::new(opts.kv_type, cache_len),
            v_cache: KvStore::new(opts.kv_type, cache_len),
            rope_cos: Vec::new(),
            rope_sin: Vec::new(),
            s: Scratch::default(),
            logits: Vec::new(),
            stats: None,
        })
    }

    /// The model this session runs.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Context length in tokens.
    pub fn ctx(&self) -> usize {
        self.ctx
    }

    /// How the context was chosen and what memory it can take.
    pub fn plan(&self) -> &ContextPlan {
        &self.plan
    }

    /// Bytes of the keys and values of `ctx` positions, the KV cache's full
    /// size. It is allocated zeroed, so the OS only backs the pages of
    /// positions actually reached.
    pub fn kv_cache_bytes(&self) -> usize {
        [&self.k_cache, &self.v_cache]
            .iter()
            .map(|c| match c {
                KvStore::F16(v) => std::mem::size_of_val(v.as_slice()),
                KvStore::F32(v) => std::mem::size_of_val(v.as_slice()),
            })
            .sum()
    }

    /// Number of tokens in the cache (the position of the next token).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether no token has been processed yet.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The tokens in the cache.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Forgets everything after the first `n` tokens (cached keys and values
    /// of earlier positions do not depend on later ones, so they stay valid).
    pub fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
    }

    /// Forgets every token (like `truncate(0)`), keeping the allocations.
    pub fn reset(&mut self) {
        self.tokens.clear();
    }

    /// From now on, adds the squares of every matrix's input columns of
    /// every processed token to fresh [`ActivationStats`] (discarding any
    /// collected before). The output projection's input counts only for the
    /// positions whose logits are asked for.
    pub fn collect_activation_stats(&mut self) {
        self.stats = Some(Box::new(ActivationStats::new(self.model.config())));
    }

    /// The statistics collected since [`Session::collect_activation_stats`],
    /// ending the collection.
    pub fn take_activation_stats(&mut self) -> Option<ActivationStats> {
        self.stats.take().map(|b| *b)
    }

    /// Processes `tokens` after those already in the cache and returns the
    /// logits (`vocab_size` values) predicting the token after the last one.
    pub fn forward(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        let n = tokens.len();
        self.forward_from(tokens, n.saturating_sub(1))
    }

    /// Like [`Session::forward`], returning the logits at every position of
    /// `tokens` (`tokens.len() * vocab_size` values, row-major).
    pub fn forward_all(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        self.forward_from(tokens, 0)
    }

    /// Processes `tokens` and returns the logits of positions `first..` of
    /// `tokens` only (the output projection is skipped for the others).
    pub fn forward_from(&mut self, tokens: &[u32], first: usize) -> Result<&[f32]> {
        let c = self.model.config();
        if tokens.is_empty() {
            return Err(Error::InvalidArgument("no tokens to process".into()));
        }
        if first >= tokens.len() {
            return Err(Error::InvalidArgument(format!(
                "logits requested from position {first} of {} tokens",
                tokens.len()
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                c.vocab_size
            )));
        }
        let needed = self.tokens.len() + tokens.len();
        if needed > self.ctx {
            return Err(Error::ContextFull {
                ctx: self.ctx,
                needed,
            });
        }
        let vocab = c.vocab_size;
        self.logits.resize((tokens.len() - first) * vocab, 0.0);
        let mut start = 0;
        for batch in tokens.chunks(MAX_BATCH) {
            let end = start + batch.len();
            let from = first.max(start);
            let out_rows = end.saturating_sub(from);
            self.forward_batch(batch);
            if out_rows > 0 {
                let dst = (from - first) * vocab;
                self.output(batch.len() - out_rows, out_rows, dst);
            }
            start = end;
        }
        Ok(&self.logits)
    }

    /// Runs the layers over one batch, leaving the residual stream in `s.x`.
    fn forward_batch(&mut self, tokens: &[u32]) {
        let c = self.model.config();
        let n = tokens.len();
        let (h, qd, kvd, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let s = &mut self.s;
        if s.x.len() < n * h {
            // Grown to the largest batch seen, not MAX_BATCH: a chat or a
            // short prompt never pays for 512-token buffers.
            let cap = n;
            s.x.resize(cap * h, 0.0);
            s.xn.resize(cap * h, 0.0);
            s.proj.resize(cap * h, 0.0);
            s.q.resize(cap * qd, 0.0);
            s.att.resize(cap * qd, 0.0);
            s.k.resize(cap * kvd, 0.0);
            s.v.resize(cap * kvd, 0.0);
            s.gate.resize(cap * ffn, 0.0);
            s.up.resize(cap * ffn, 0.0);
        }
        let pos0 = self.tokens.len();
        extend_rope_tables(c, pos0 + n, &mut self.rope_cos, &mut self.rope_sin);
        for (t, &id) in tokens.iter().enumerate() {
            self.w
                .embed
                .dequantize_row(id as usize, &mut s.x[t * h..(t + 1) * h]);
        }
        for (l, lw) in self.w.layers.iter().enumerate() {
            self::layer(
                c,
                lw,
                l,
                n,
                pos0,
                self.ctx,
                s,
                &mut self.k_cache,
                &mut self.v_cache,
                &self.rope_cos,
                &self.rope_sin,
                self.stats.as_mut().map(|st| &mut st.layers[l]),
            );
        }
        if let Some(st) = &mut self.stats {
            st.layer_rows += n as u64;
        }
        self.tokens.extend_from_slice(tokens);
    }

    /// Final norm and output projection of the batch rows `row0..row0+rows`,
    /// written to `logits[dst..]`.
    fn output(&mut self, row0: usize, rows: usize, dst: usize) {
        let c = self.model.config();
        let h = c.hidden_size;
        let s = &mut self.s;
        for t in row0..row0 + rows {
            rms_norm(
                &s.x[t * h..(t + 1) * h],
                self.w.final_norm,
                c.rms_norm_eps,
                &mut s.xn[t * h..(t + 1) * h],
            );
        }
        if let Some(st) = &mut self.stats {
            add_squares(&mut st.output_in, &s.xn[row0 * h..(row0 + rows) * h]);
            st.output_rows += rows as u64;
        }
        let vocab = c.vocab_size;
        kernels::matmul(
            &self.w.output,
            &s.xn[row0 * h..(row0 + rows) * h],
            rows,
            &mut self.logits[dst..dst + rows * vocab],
        );
    }
}

/// One transformer block over `n` tokens at positions `pos0..pos0+n`.
#[allow(clippy::too_many_arguments)]
fn layer(
    c: &Config,
    w: &LayerWeights,
    l: usize,
    n: usize,
    pos0: usize,
    ctx: usize,
    s: &mut Scratch,
    k_cache: &mut KvStore,
    v_cache: &mut KvStore,
    rope_cos: &[f32],
    rope_sin: &[f32],
    mut stats: Option<&mut LayerSums>,
) {
    let (h, qd, kvd, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let hd = c.head_dim;
    let eps = c.rms_norm_eps;

    // Per-token elementwise work runs on the pool too: in prefill it was
    // an eighth of the time, serial on the calling thread.
    let pool = crate::pool::global();

    // Attention.
    norm_rows(pool, &s.x[..n * h], w.attn_norm, eps, &mut s.xn[..n * h]);
    let xn = &s.xn[..n * h];
    if let Some(st) = stats.as_deref_mut() {
        add_squares(&mut st.attention_in, xn);
    }
    kernels::matmul_many(
        xn,
        n,
        &mut [
            (&w.q, &mut s.q[..n * qd]),
            (&w.k, &mut s.k[..n * kvd]),
            (&w.v, &mut s.v[..n * kvd]),
        ],
    );
    let half_dim = hd / 2;
    let rope_rows = |first: usize, rows: &mut [f32], width: usize| {
        for (i, row) in rows.chunks_exact_mut(width).enumerate() {
            let p = pos0 + first + i;
            let cos = &rope_cos[p * half_dim..(p + 1) * half_dim];
            let sin = &rope_sin[p * half_dim..(p + 1) * half_dim];
            for head in row.chunks_exact_mut(hd) {
                rope(head, cos, sin);
            }
        }
    };
    pool.for_rows_mut(&mut s.q[..n * qd], qd, &|first, rows| {
        rope_rows(first, rows, qd)
    });
    pool.for_rows_mut(&mut s.k[..n * kvd], kvd, &|first, rows| {
        rope_rows(first, rows, kvd)
    });
    match (k_cache, v_cache) {
        (KvStore::F16(k), KvStore::F16(v)) => attention::<f16>(
            c,
            l,
            n,
            pos0,
            ctx,
            s,
            bytemuck::cast_slice_mut(k),
            bytemuck::cast_slice_mut(v),
        ),
        (KvStore::F32(k), KvStore::F32(v)) => attention::<f32>(c, l, n, pos0, ctx, s, k, v),
        _ => unreachable!("keys and values share one type"),
    }
    if let Some(st) = stats.as_deref_mut() {
        add_squares(&mut st.heads, &s.att[..n * qd]);
    }
    kernels::matmul(&w.o, &s.att[..n * qd], n, &mut s.proj[..n * h]);
    add_rows(pool, &mut s.x[..n * h], &s.proj[..n * h], h);

    // SwiGLU MLP.
    norm_rows(pool, &s.x[..n * h], w.ffn_norm, eps, &mut s.xn[..n * h]);
    let xn = &s.xn[..n * h];
    if let Some(st) = stats.as_deref_mut() {
        add_squares(&mut st.mlp_in, xn);
    }
    kernels::matmul_many(
        xn,
        n,
        &mut [
            (&w.gate, &mut s.gate[..n * ffn]),
            (&w.up, &mut s.up[..n * ffn]),
        ],
    );
    let up = &s.up[..n * ffn];
    pool.for_rows_mut(&mut s.gate[..n * ffn], ffn, &|first, rows| {
        kernels::swiglu(rows, &up[first * ffn..first * ffn + rows.len()])
    });
    if let Some(st) = stats {
        add_squares(&mut st.swiglu, &s.gate[..n * ffn]);
    }
    kernels::matmul(&w.down, &s.gate[..n * ffn], n, &mut s.proj[..n * h]);
    add_rows(pool, &mut s.x[..n * h], &s.proj[..n * h], h);
}

/// [`rms_norm`] of each row of `x` (rows of `w.len()`) into `out`.
fn norm_rows(pool: &crate::pool::Pool, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    pool.for_rows_mut(out, h, &|first, rows| {
        for (i, o) in rows.chunks_exact_mut(h).enumerate() {
            let t = first + i;
            rms_norm(&x[t * h..(t + 1) * h], w, eps, o);
        }
    });
}

/// `x += y` (the residual connection), rows of `h`.
fn add_rows(pool: &crate::pool::Pool, x: &mut [f32], y: &[f32], h: usize) {
    pool.for_rows_mut(x, h, &|first, rows| {
        for (a, b) in rows.iter_mut().zip(&y[first * h..]) {
            *a += b;
        }
    });
}

/// Stores the batch's keys and values at positions `pos0..pos0+n` and
/// computes every query head's causal attention into `s.att`.
#[allow(clippy::too_many_arguments)]
fn attention<E: KvElem>(
    c: &Config,
    l: usize,
    n: usize,
    pos0: usize,
    ctx: usize,
    s: &mut Scratch,
    kc: &mut [E],
    vc: &mut [E],
) {
    let (qd, kvd, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
    let head_stride = ctx * hd;
    let layer_base = l * c.num_kv_heads * head_stride;
    for t in 0..n {
        for kh in 0..c.num_kv_heads {
            let dst = layer_base + kh * head_stride + (pos0 + t) * hd;
            let src = t * kvd + kh * hd;
            for i in 0..hd {
                kc[dst + i] = E::from_f32(s.k[src + i]);
                vc[dst + i] = E::from_f32(s.v[src + i]);
            }
        }
    }
    let (kc, vc) = (&*kc, &*vc);
    let group = c.num_heads / c.num_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let heads = c.num_heads;
    let att = crate::pool::SharedOut::new(&mut s.att);
    assert!(s.att.len() >= n * qd);
    let q = &s.q;
    let pool = crate::pool::global();
    if n >= BATCHED_ATTENTION_MIN_TOKENS && group <= kernels::MAX_ATTEND_QUERIES {
        // Every query of the batch in a KV head's group reads the same cached
        // rows: widen them to f32 once, instead of converting them again for
        // each of the batch's `n * group` queries (prefill spent a fifth of
        // its time in attention, much of it converting).
        let len = pos0 + n;
        for kh in 0..c.num_kv_heads {
            let base = layer_base + kh * head_stride;
            let keys = E::rows_f32(&kc[base..base + len * hd], &mut s.wide_k);
            let values = E::rows_f32(&vc[base..base + len * hd], &mut s.wide_v);
            // One task per run of tokens: its queries (every head of the
            // group for each token) walk the cached rows together.
            let tokens_per_task = (QUERIES_PER_TASK / group).max(1);
            pool.run(n.div_ceil(tokens_per_task), &|task| {
                let (t0, t1) = (
                    task * tokens_per_task,
                    ((task + 1) * tokens_per_task).min(n),
                );
                let (nq, longest) = ((t1 - t0) * group, pos0 + t1);
                ATTEND_SCRATCH.with(|cell| {
                    let mut scratch = cell.borrow_mut();
                    let AttendScratch {
                        q: qs,
                        lens,
                        scores,
                        out,
                    } = &mut *scratch;
                    qs.clear();
                    lens.clear();
                    for t in t0..t1 {
                        let first = t * qd + kh * group * hd;
                        qs.extend_from_slice(&q[first..first + group * hd]);
                        lens.extend(std::iter::repeat_n(pos0 + t + 1, group));
                    }
                    if scores.len() < nq * longest {
                        scores.resize(nq * longest, 0.0);
                    }
                    out.resize(nq * hd, 0.0);
                    kernels::attend_f32_many(
                        qs,
                        lens,
                        &keys[..longest * hd],
                        &values[..longest * hd],
                        scale,
                        &mut scores[..nq * longest],
                        out,
                    );
                    for (t, rows) in (t0..t1).zip(out.chunks_exact(group * hd)) {
                        // SAFETY: the group's heads of token t are written by
                        // this task alone (tasks own disjoint tokens, KV heads
                        // run one after another) and lie within `s.att`
                        // (asserted above); `s.att` outlives the run.
                        let dst = unsafe { att.slice((t * heads + kh * group) * hd, group * hd) };
                        dst.copy_from_slice(rows);
                    }
                });
            });
        }
        return;
    }
    // One task per (token, head): every task writes its own `hd` slice of
    // `s.att`; softmax scores live in a per-thread scratch.
    pool.run(n * heads, &|task| {
        let (t, head) = (task / heads, task % heads);
        let len = pos0 + t + 1;
        let base = layer_base + (head / group) * head_stride;
        // SAFETY: task (t, head) is the only one touching this range, which
        // is in bounds (asserted above); `s.att` outlives the run.
        let out = unsafe { att.slice((t * heads + head) * hd, hd) };
        SCORES.with(|scores| {
            let mut scores = scores.borrow_mut();
            if scores.len() < len {
                // Doubling: few reallocations, and a long context costs
                // only what is reached.
                scores.resize((2 * len).clamp(len, ctx.max(len)), 0.0);
            }
            attend(
                &q[t * qd + head * hd..t * qd + (head + 1) * hd],
                &kc[base..base + len * hd],
                &vc[base..base + len * hd],
                scale,
                &mut scores[..len],
                out,
            );
        });
    });
}

/// Batches from this many tokens take the batched attention path (see
/// [`attention`]); a single decoded token reads each cached row once per
/// query head anyway.
const BATCHED_ATTENTION_MIN_TOKENS: usize = 8;

/// Queries one prefill attention task takes (a run of tokens times the heads
/// sharing a KV head): enough that each L1-sized block of keys and values
/// serves many, few enough that a 512-token batch still makes dozens of tasks.
pub(crate) const QUERIES_PER_TASK: usize = 24;

/// A prefill attention task's gathered queries, their lengths, scores and
/// outputs, reused across tasks so prefill does not allocate per task.
#[derive(Default)]
struct AttendScratch {
    q: Vec<f32>,
    lens: Vec<usize>,
    scores: Vec<f32>,
    out: Vec<f32>,
}

thread_local! {
    static ATTEND_SCRATCH: std::cell::RefCell<AttendScratch> =
        std::cell::RefCell::new(AttendScratch::default());
    /// Attention scores of the head a thread is working on, sized once to
    /// the context so decode does not allocate.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Causal attention of one query head over `len` cached positions:
/// `out = softmax(q·K / sqrt(d)) · V`, softmax in f32.
fn attend<E: KvElem>(
    q: &[f32],
    keys: &[E],
    values: &[E],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    E::attend(q, keys, values, scale, scores, out)
}

/// `out = w * x / sqrt(mean(x²) + eps)`; the mean is accumulated in f64 so
/// long rows lose no precision.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let inv = 1.0 / ((ss / x.len() as f64) as f32 + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * inv);
    }
}

/// HF "rotate half" RoPE: pairs are `(x[i], x[i + d/2])`.
fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let (a, b) = x.split_at_mut(half);
    for i in 0..half {
        let (x0, x1) = (a[i], b[i]);
        a[i] = x0 * cos[i] - x1 * sin[i];
        b[i] = x1 * cos[i] + x0 * sin[i];
    }
}

/// Extends the rotation tables to the first `positions` positions, computed
/// in f32 exactly as transformers does: `inv_freq[i] = 1 / theta^(2i/d)`,
/// angle = position * inv_freq, with linear scaling dividing the
/// frequencies by the factor.
fn extend_rope_tables(c: &Config, positions: usize, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
    let hd = c.head_dim;
    let have = cos.len() / (hd / 2);
    if have >= positions {
        return;
    }
    let factor = match c.rope_scaling {
        RopeScaling::None => 1.0,
        RopeScaling::Linear { factor } => factor,
    };
    let inv_freq: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / c.rope_theta.powf((2 * i) as f32 / hd as f32) / factor)
        .collect();
    cos.reserve((positions - have) * hd / 2);
    sin.reserve((positions - have) * hd / 2);
    for p in have..positions {
        for &f in &inv_freq {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_pairs_half_apart() {
        let mut x = [1.0, 2.0, 3.0, 4.0];
        let (c, s) = ([0.0, 1.0], [1.0, 0.0]);
        rope(&mut x, &c, &s);
        // Pair (1, 3) rotated by 90°, pair (2, 4) unchanged.
        assert_eq!(x, [-3.0, 2.0, 1.0, 4.0]);
    }

    #[test]
    fn attention_over_one_position_returns_its_value() {
        let keys = [f16::from_f32(0.5); 4];
        let values: Vec<f16> = [1.0, -2.0, 3.0, 0.25].map(f16::from_f32).to_vec();
        let mut out = [9.0; 4];
        let mut scores = [0.0];
        attend(&[1.0; 4], &keys, &values, 0.5, &mut scores, &mut out);
        assert_eq!(out, [1.0, -2.0, 3.0, 0.25]);
    }

    #[test]
    fn rms_norm_scales_to_unit_rms() {
        let mut out = [0.0; 2];
        rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.0, &mut out);
        let r = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / r).abs() < 1e-6 && (out[1] - 8.0 / r).abs() < 1e-6);
    }
}
