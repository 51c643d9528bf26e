//! The `nibble` command line: parses arguments and calls the library.

use clap::{Args, Parser, Subcommand};
use nibble::bench::{bench, peak_rss_bytes, BenchOptions, Stat};
use nibble::error::read_prompt_file;
use nibble::perplexity::{perplexity, perplexity_kl};
use nibble::{
    generate, Conversation, Error, GenerateOptions, Model, Result, Sampler, SamplerOptions,
    Session, SessionOptions, StopReason,
};
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[path = "nibble/repl.rs"]
mod repl;

#[derive(Parser)]
#[command(
    name = "nibble",
    version,
    about = "Run LLaMA-2-family models from a .nbl file on the CPU"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Continue a prompt, streaming the text to stdout.
    Run(RunArgs),
    /// Chat with the model using its chat template.
    ///
    /// What you type is trusted: special-token text in it (`<|im_start|>`,
    /// `</s>`) is read as the control token, as transformers does. `nibble
    /// serve` keeps such text in message contents as plain text.
    Chat(ChatArgs),
    /// llama.cpp-style perplexity of a text file.
    Perplexity(PerplexityArgs),
    /// Prompt-processing and generation speed (llama-bench style).
    Bench(BenchArgs),
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(ServeArgs),
}

#[derive(Args)]
struct Common {
    /// The .nbl model file.
    #[arg(short = 'm', long)]
    model: PathBuf,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// Memory the KV cache and buffers may take, beyond the mapped model
    /// file (e.g. 4G, 512M; default: what the OS reports available). A
    /// context that cannot fit is refused before anything is allocated; the
    /// model's own context is shortened to fit.
    #[arg(long, value_parser = nibble::model::memory::parse_bytes)]
    max_memory: Option<u64>,
}

#[derive(Args)]
struct Sampling {
    /// Temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temp: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Keep the most likely tokens up to this cumulative probability (1 = off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens less likely than this times the most likely one (0 = off).
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Penalize tokens seen in the last 64 (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Random seed (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when the output contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Context length in tokens (default: the model's).
    #[arg(long)]
    ctx: Option<usize>,
}

impl Sampling {
    fn sampler(&self) -> Result<Sampler> {
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        Sampler::new(SamplerOptions {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            seed,
            ..SamplerOptions::default()
        })
        .map_err(|e| match e {
            // The library names SamplerOptions' fields; here they are flags.
            Error::InvalidArgument(m) => Error::InvalidArgument(
                [
                    ("temperature", "--temp"),
                    ("top_p", "--top-p"),
                    ("min_p", "--min-p"),
                    ("repeat_penalty", "--repeat-penalty"),
                ]
                .iter()
                .find_map(|(field, flag)| m.strip_prefix(field).map(|rest| format!("{flag}{rest}")))
                .unwrap_or(m),
            ),
            e => e,
        })
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// The prompt.
    #[arg(short = 'p', long, conflicts_with = "file")]
    prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short = 'f', long)]
    file: Option<PathBuf>,
    /// Tokens to generate.
    #[arg(short = 'n', long, default_value_t = 128)]
    n_predict: usize,
    /// Keep generating past end-of-sequence tokens (as llama.cpp's
    /// `--ignore-eos`), e.g. to time or measure exactly -n tokens.
    #[arg(long)]
    ignore_eos: bool,
    #[command(flatten)]
    sampling: Sampling,
    /// Print one JSON object {"prompt_tokens","tokens","text"} instead of streaming.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    common: Common,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per reply.
    #[arg(short = 'n', long, default_value_t = 512)]
    n_predict: usize,
    #[command(flatten)]
    sampling: Sampling,
    /// On a terminal: print each turn's token counts and speeds to stderr.
    #[arg(long)]
    verbose: bool,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    common: Common,
    /// The text file to evaluate.
    #[arg(short = 'f', long)]
    file: PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Print {"perplexity","tokens_scored","chunks"} only (with --kl-base
    /// also "kl_mean","kl_p99","top1_agreement","base_perplexity").
    #[arg(long)]
    json: bool,
    /// Also run this base model (e.g. the f32 conversion) on the same windows
    /// and report KL(base || model) and top-1 agreement, as llama.cpp's
    /// --kl-divergence does.
    #[arg(long)]
    kl_base: Option<PathBuf>,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    common: Common,
    /// Prompt tokens for the pp test (0 = skip).
    #[arg(short = 'p', long, default_value_t = 512)]
    n_prompt: usize,
    /// Generated tokens for the tg test (0 = skip).
    #[arg(short = 'n', long, default_value_t = 128)]
    n_gen: usize,
    /// Tokens in the KV cache before the tg test.
    #[arg(short = 'd', long, default_value_t = 0)]
    depth: usize,
    /// Repetitions.
    #[arg(short = 'r', long, default_value_t = 5)]
    reps: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    common: Common,
    /// Address to listen on (0.0.0.0 exposes the server to the network).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Context length in tokens (default: the model's).
    #[arg(long)]
    ctx: Option<usize>,
    /// Requests that may wait while one is generated; more get 503.
    #[arg(long, default_value_t = nibble::server::ServerOptions::default().max_queue)]
    max_queue: usize,
}

fn main() -> ExitCode {
    nibble::mapped_file_guard::install();
    let cli = Cli::parse();
    // What to change when a context does not fit in memory.
    let hint = match &cli.cmd {
        Cmd::Bench(_) => "lower -p, -n or -d",
        _ => "lower --ctx",
    };
    let result = match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Chat(a) => chat(a),
        Cmd::Perplexity(a) => perplexity_cmd(a),
        Cmd::Bench(a) => bench_cmd(a),
        Cmd::Serve(a) => serve_cmd(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of stdout went away (`| head`): exit quietly with the
        // status a shell reports for SIGPIPE (128 + 13). (Rust ignores the
        // signal, so the write fails with EPIPE instead of killing us.)
        Err(Error::Io { path, source })
            if path == Path::new(STDOUT) && source.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            ExitCode::from(141)
        }
        Err(e) => {
            let _ = std::io::stdout().flush();
            if let Error::OutOfMemory { limit, .. } = &e {
                let raise = match limit {
                    nibble::model::MemoryLimit::Limit(_) => " or raise --max-memory",
                    nibble::model::MemoryLimit::Available(_) => "",
                };
                eprintln!("error: {e} ({hint}{raise})");
            } else if let Error::ContextFull { .. } = &e {
                eprintln!("error: {e} (raise --ctx)");
            } else {
                eprintln!("error: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Sets up the thread pool and opens the model, reporting the load time.
fn load(c: &Common) -> Result<(Model, f64)> {
    if let Some(n) = c.threads {
        if n == 0 {
            return Err(Error::InvalidArgument("-t must be at least 1".into()));
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| Error::InvalidArgument(format!("cannot start {n} threads: {e}")))?;
        nibble::pool::set_threads(n);
    }
    nibble::kernels::init().map_err(Error::Kernels)?;
    nibble::model::set_memory_limit(c.max_memory);
    let t = Instant::now();
    let model = Model::open(&c.model)?;
    Ok((model, t.elapsed().as_secs_f64()))
}

/// The context for `run`, `chat` and `serve`: `--ctx`, or the model's own
/// shortened to fit in memory (with a note saying so); refused up front when
/// it cannot fit.
fn session_ctx(model: &Model, ctx: Option<usize>) -> Result<Option<usize>> {
    let plan = nibble::model::ContextPlan::new(
        model,
        &SessionOptions {
            ctx,
            ..SessionOptions::default()
        },
    )?;
    if let Some(full) = plan.capped_from {
        eprintln!(
            "note: {}: the model's context of {full} tokens does not fit in {}; using {} tokens",
            model.path().display(),
            plan.limit
                .map(|l| nibble::model::memory::human_bytes(l.bytes()))
                .unwrap_or_default(),
            plan.ctx
        );
    }
    Ok(Some(plan.ctx))
}

/// Ctrl-C (and SIGTERM) for `run` and `chat`: during generation the first
/// one ends the current answer (through [`GenerateOptions::cancel`]); at the
/// chat prompt, or when a second one arrives before generation has noticed
/// the first (a long prompt is still being processed), the process exits.
struct Interrupt {
    cancel: Arc<AtomicBool>,
    generating: Arc<AtomicBool>,
}

impl Interrupt {
    fn install() -> Result<Self> {
        let cancel = Arc::new(AtomicBool::new(false));
        let generating = Arc::new(AtomicBool::new(false));
        let (c, g) = (cancel.clone(), generating.clone());
        ctrlc::set_handler(move || {
            if g.load(Ordering::SeqCst) && !c.swap(true, Ordering::SeqCst) {
                return;
            }
            // Not generating: the user wants out, which is a normal end of a
            // chat. A second interrupt while generating is a forced exit.
            let forced = g.load(Ordering::SeqCst);
            eprintln!();
            std::process::exit(if forced { 130 } else { 0 });
        })
        .map_err(|e| Error::InvalidArgument(format!("cannot install the Ctrl-C handler: {e}")))?;
        Ok(Self { cancel, generating })
    }

    /// Marks the start of an answer and returns the flag to pass to
    /// [`generate`].
    fn start(&self) -> Option<Arc<AtomicBool>> {
        self.cancel.store(false, Ordering::SeqCst);
        self.generating.store(true, Ordering::SeqCst);
        Some(self.cancel.clone())
    }

    fn stop(&self) {
        self.generating.store(false, Ordering::SeqCst);
    }
}

fn peak_rss_text() -> String {
    match peak_rss_bytes() {
        Some(b) => format!("{:.1} MiB", b as f64 / MIB),
        None => "unknown".into(),
    }
}

fn tps(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// `println!` that returns a write error (as [`Error::Io`] on `<stdout>`)
/// instead of panicking when stdout is a closed pipe or a full disk.
macro_rules! outln {
    ($($arg:tt)*) => {{
        let mut out = std::io::stdout().lock();
        writeln!(out, $($arg)*).and_then(|()| out.flush()).map_err(io_err)
    }};
}

/// How errors name standard output.
const STDOUT: &str = "<stdout>";

fn io_err(e: std::io::Error) -> Error {
    Error::Io {
        path: Path::new(STDOUT).to_owned(),
        source: e,
    }
}

fn run(a: RunArgs) -> Result<()> {
    let text = match (&a.prompt, &a.file) {
        (Some(p), None) => p.clone(),
        (None, Some(f)) => read_prompt_file(f)?,
        _ => {
            return Err(Error::InvalidArgument(
                "give a prompt with -p TEXT or -f FILE".into(),
            ))
        }
    };
    if text.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    let mut sampler = a.sampling.sampler()?;
    let interrupt = Interrupt::install()?;
    let (model, load_s) = load(&a.common)?;
    eprintln!("load: {load_s:.2} s ({})", a.common.model.display());
    let prompt = model.tokenizer().encode(&text, true)?;
    if prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    let mut session = Session::new(
        &model,
        SessionOptions {
            ctx: session_ctx(&model, a.sampling.ctx)?,
            ..SessionOptions::default()
        },
    )?;
    let opts = GenerateOptions {
        max_tokens: a.n_predict,
        stop: a.sampling.stop.clone(),
        stop_at_eos: !a.ignore_eos,
        cancel: interrupt.start(),
    };
    let t = Instant::now();
    let mut gen = generate(&mut session, &prompt, &mut sampler, opts)?;
    let prompt_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut tokens = Vec::new();
    let mut out_text = String::new();
    let mut stdout = std::io::stdout().lock();
    for piece in &mut gen {
        let piece = piece?;
        tokens.extend(piece.token);
        if a.json {
            out_text.push_str(&piece.text);
        } else {
            stdout.write_all(piece.text.as_bytes()).map_err(io_err)?;
            stdout.flush().map_err(io_err)?;
        }
    }
    let gen_s = t.elapsed().as_secs_f64();
    interrupt.stop();
    let reason = gen.stop_reason();
    if a.json {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            prompt_tokens: &'a [u32],
            tokens: &'a [u32],
            text: &'a str,
        }
        let out = Out {
            prompt_tokens: &prompt,
            tokens: &tokens,
            text: &out_text,
        };
        let json = serde_json::to_string(&out).expect("plain data serializes");
        writeln!(stdout, "{json}").map_err(io_err)?;
    } else {
        writeln!(stdout).map_err(io_err)?;
    }
    match reason {
        Some(StopReason::ContextFull) => {
            eprintln!("stopped: the context of {} tokens is full", session.ctx())
        }
        Some(StopReason::Cancelled) => eprintln!("stopped: interrupted"),
        _ => {}
    }
    eprintln!(
        "prompt: {} tokens, {:.2} s, {:.1} tok/s",
        prompt.len(),
        prompt_s,
        tps(prompt.len(), prompt_s)
    );
    eprintln!(
        "generation: {} tokens, {:.2} s, {:.1} tok/s",
        tokens.len(),
        gen_s,
        tps(tokens.len(), gen_s)
    );
    // The goal for resident memory: the weights, the KV cache of this
    // context, and 10% for everything else (tokenizer, code, scratch).
    let budget = (model.file().file_len() as f64 + session.kv_cache_bytes() as f64) * 1.1;
    eprintln!(
        "peak RSS: {} (budget {:.1} MiB = file {:.1} MiB + KV cache {:.1} MiB for {} tokens, + 10%)",
        peak_rss_text(),
        budget / MIB,
        model.file().file_len() as f64 / MIB,
        session.kv_cache_bytes() as f64 / MIB,
        session.ctx()
    );
    Ok(())
}

const MIB: f64 = 1024.0 * 1024.0;

fn chat(a: ChatArgs) -> Result<()> {
    let mut sampler = a.sampling.sampler()?;
    let interrupt = Interrupt::install()?;
    let (model, load_s) = load(&a.common)?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "load: {load_s:.2} s. Type a message (/help for commands); Ctrl-C stops an \
             answer, Ctrl-D or /bye ends the chat."
        );
    }
    let mut conv = Conversation::new(
        &model,
        a.system.as_deref(),
        SessionOptions {
            ctx: session_ctx(&model, a.sampling.ctx)?,
            ..SessionOptions::default()
        },
    )?;
    if interactive {
        let mut turn = |conv: &mut Conversation, user: &str, sampler: &mut Sampler| {
            answer(conv, user, sampler, &a, &interrupt)
        };
        return repl::run(
            &mut conv,
            a.system.clone(),
            &mut sampler,
            a.verbose,
            &mut turn,
        );
    }
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        line.clear();
        let n = stdin.lock().read_line(&mut line).map_err(|e| Error::Io {
            path: Path::new("<stdin>").to_owned(),
            source: e,
        })?;
        if n == 0 {
            return Ok(());
        }
        let user = line.trim_end_matches(['\n', '\r']);
        if user.trim().is_empty() {
            continue;
        }
        answer(&mut conv, user, &mut sampler, &a, &interrupt)?;
    }
}

/// Streams the answer to one user message to stdout and records it in the
/// conversation; a full context is an error (after the partial answer).
fn answer(
    conv: &mut Conversation,
    user: &str,
    sampler: &mut Sampler,
    a: &ChatArgs,
    interrupt: &Interrupt,
) -> Result<repl::TurnStats> {
    let mut stdout = std::io::stdout();
    let suffix = conv.user_turn(user)?;
    let opts = GenerateOptions {
        max_tokens: a.n_predict,
        stop: a.sampling.stop.clone(),
        stop_at_eos: true,
        cancel: interrupt.start(),
    };
    let t0 = Instant::now();
    let mut first: Option<f64> = None;
    let mut reply = String::new();
    let mut gen = match generate(conv.session(), &suffix, sampler, opts) {
        Ok(g) => g,
        Err(e) => {
            interrupt.stop();
            return Err(e);
        }
    };
    for piece in &mut gen {
        let piece = match piece {
            Ok(p) => p,
            Err(e) => {
                interrupt.stop();
                return Err(e);
            }
        };
        first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        reply.push_str(&piece.text);
        stdout.write_all(piece.text.as_bytes()).map_err(io_err)?;
        stdout.flush().map_err(io_err)?;
    }
    interrupt.stop();
    let total = t0.elapsed().as_secs_f64();
    let stats = repl::TurnStats {
        prompt_tokens: suffix.len(),
        prompt_s: first.unwrap_or(total),
        gen_tokens: gen.generated(),
        gen_s: total - first.unwrap_or(total),
    };
    let full = gen.stop_reason() == Some(StopReason::ContextFull);
    writeln!(stdout).map_err(io_err)?;
    if gen.stop_reason() == Some(StopReason::Cancelled) {
        // The partial answer stays in the conversation, as shown.
        eprintln!("[interrupted]");
    }
    conv.add_reply(&reply);
    if full {
        return Err(Error::ContextFull {
            ctx: conv.session().ctx(),
            needed: conv.session().ctx() + 1,
        });
    }
    Ok(stats)
}

fn perplexity_cmd(a: PerplexityArgs) -> Result<()> {
    let text = read_prompt_file(&a.file)?;
    let (model, load_s) = load(&a.common)?;
    if !a.json {
        eprintln!("load: {load_s:.2} s");
    }
    if let Some(base) = &a.kl_base {
        return kl_cmd(&a, &text, model, base);
    }
    let t = Instant::now();
    let json = a.json;
    let r = perplexity(&model, &text, a.ctx, ppl_progress(json))?;
    if json {
        outln!(
            "{}",
            serde_json::json!({
                "perplexity": r.perplexity,
                "tokens_scored": r.tokens_scored,
                "chunks": r.chunks,
            })
        )?;
    } else {
        outln!("perplexity: {:.4}", r.perplexity)?;
        eprintln!(
            "{} chunks of {} tokens, {} tokens scored, {:.1} s, peak RSS {}",
            r.chunks,
            a.ctx,
            r.tokens_scored,
            t.elapsed().as_secs_f64(),
            peak_rss_text()
        );
    }
    Ok(())
}

/// The running perplexity on stderr, one `[done/total] value` per chunk
/// (nothing with `--json`, whose stdout is the one JSON object).
fn ppl_progress(json: bool) -> impl FnMut(usize, usize, f64) {
    move |done, total, ppl| {
        if !json {
            eprint!("[{done}/{total}] {ppl:.4}  ");
            if done == total {
                eprintln!();
            }
        }
    }
}

fn kl_cmd(a: &PerplexityArgs, text: &str, model: Model, base: &Path) -> Result<()> {
    let base = Model::open(base)?;
    let t = Instant::now();
    let json = a.json;
    let r = perplexity_kl(&model, &base, text, a.ctx, ppl_progress(json))?;
    if json {
        outln!(
            "{}",
            serde_json::json!({
                "perplexity": r.model.perplexity,
                "tokens_scored": r.model.tokens_scored,
                "chunks": r.model.chunks,
                "base_perplexity": r.base.perplexity,
                "kl_mean": r.kl_mean,
                "kl_p99": r.kl_p99,
                "top1_agreement": r.top1_agreement,
            })
        )?;
    } else {
        outln!("perplexity: {:.4}", r.model.perplexity)?;
        outln!("base perplexity: {:.4}", r.base.perplexity)?;
        outln!("mean KL(base || model): {:.6}", r.kl_mean)?;
        outln!("99th percentile KL: {:.6}", r.kl_p99)?;
        outln!("top-1 agreement: {:.4}", r.top1_agreement)?;
        eprintln!(
            "{} chunks of {} tokens, {} tokens scored, {:.1} s, peak RSS {}",
            r.model.chunks,
            a.ctx,
            r.model.tokens_scored,
            t.elapsed().as_secs_f64(),
            peak_rss_text()
        );
    }
    Ok(())
}

fn bench_cmd(a: BenchArgs) -> Result<()> {
    let (model, load_s) = load(&a.common)?;
    let r = bench(
        &model,
        &BenchOptions {
            prompt_tokens: a.n_prompt,
            gen_tokens: a.n_gen,
            depth: a.depth,
            repetitions: a.reps,
        },
    )?;
    let kernels = nibble::kernels::active_name();
    let peak = peak_rss_bytes();
    if a.json {
        let mean = |s: Option<Stat>| s.map(|s| s.mean);
        outln!(
            "{}",
            serde_json::json!({
                "pp_tps": mean(r.pp_tps),
                "tg_tps": mean(r.tg_tps),
                "pp_tps_stddev": r.pp_tps.map(|s| s.stddev),
                "tg_tps_stddev": r.tg_tps.map(|s| s.stddev),
                "depth": a.depth,
                "load_s": load_s,
                "peak_rss_bytes": peak,
                "kernels": kernels,
            })
        )?;
        return Ok(());
    }
    outln!(
        "model: {} ({} threads, kernels {kernels})",
        a.common.model.display(),
        nibble::pool::global().threads()
    )?;
    outln!("load: {load_s:.3} s")?;
    if let Some(s) = r.pp_tps {
        outln!("pp{}: {:.1} ± {:.1} tok/s", a.n_prompt, s.mean, s.stddev)?;
    }
    if let Some(s) = r.tg_tps {
        outln!(
            "tg{} @ depth {}: {:.1} ± {:.1} tok/s",
            a.n_gen,
            a.depth,
            s.mean,
            s.stddev
        )?;
    }
    outln!("peak RSS: {}", peak_rss_text())?;
    Ok(())
}

fn serve_cmd(a: ServeArgs) -> Result<()> {
    let (model, load_s) = load(&a.common)?;
    eprintln!("load: {load_s:.2} s");
    let options = nibble::server::ServerOptions {
        ctx: session_ctx(&model, a.ctx)?,
        max_queue: a.max_queue,
        ..Default::default()
    };
    nibble::server::serve(model, &a.host, a.port, options)
}
