//! `nibble-tools`: the command line over the `nibble_tools` library.

use clap::{Parser, Subcommand, ValueEnum};
use nibble_tools::convert::{convert, ConvertOptions, QuantPolicy, TypeOverride};
use nibble_tools::inspect;
use nibble_tools::synth::{synth, Preset, SynthDtype, SynthOptions};
use nibble_tools::ToolError;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "nibble-tools",
    version,
    about = "Convert, inspect and verify nibble .nbl model files"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Quant {
    F32,
    F16,
    Q8,
    Q4,
    Q4k,
}

impl From<Quant> for QuantPolicy {
    fn from(q: Quant) -> Self {
        match q {
            Quant::F32 => Self::F32,
            Quant::F16 => Self::F16,
            Quant::Q8 => Self::Q8,
            Quant::Q4 => Self::Q4,
            Quant::Q4k => Self::Q4K,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum PresetArg {
    #[value(name = "llama2-7b")]
    Llama2_7b,
    #[value(name = "llama2-13b")]
    Llama2_13b,
    #[value(name = "llama2-70b")]
    Llama2_70b,
    Tiny,
    #[value(name = "tiny-256")]
    Tiny256,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F16,
    Bf16,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a HuggingFace LLaMA checkpoint directory, or a LLaMA GGUF
    /// file, into a .nbl file.
    Convert {
        /// Directory with config.json, tokenizer.json and *.safetensors, or a
        /// llama.cpp .gguf file (general.architecture = llama).
        input: PathBuf,
        /// The .nbl file to write.
        #[arg(short, long)]
        output: PathBuf,
        /// Weight type policy (norms always stay f32; under q4 and q4k the
        /// output projection stays 8-bit, as q8r; in a grouped-query model
        /// v_proj gets f16 under q8, q8 under q4, and q8 under q4k after the
        /// first quarter of the layers). q4k is 4-bit affine with
        /// 6-bit sub-block scales: far more accurate than q4 at the same size.
        #[arg(long, value_enum, default_value = "q4k")]
        quant: Quant,
        /// PATTERN=TYPE: store the matrices whose name contains PATTERN as
        /// TYPE (f32, f16, q8, q8r, q4, q4k) instead; repeatable, the first
        /// matching pattern wins, e.g. `--tensor-type embed_tokens=q8`.
        #[arg(long = "tensor-type", value_name = "PATTERN=TYPE")]
        tensor_types: Vec<TypeOverride>,
        /// Also print each matrix's quantization error (RMSE relative to the
        /// source tensor's RMS), measured against the source checkpoint.
        #[arg(long)]
        report: bool,
        /// Importance file from `nibble-tools imatrix`: q4k matrices then
        /// minimize rounding error weighted by how strongly each input
        /// channel is driven.
        #[arg(long, value_name = "FILE")]
        imatrix: Option<PathBuf>,
    },
    /// Run a (full-precision) .nbl model over a calibration text and save
    /// each matrix's input statistics (mean square per column) for
    /// `convert --imatrix`.
    Imatrix {
        /// The model, ideally the f32 or f16 conversion.
        #[arg(short, long)]
        model: PathBuf,
        /// Calibration text (UTF-8); not the text you evaluate on.
        #[arg(short, long)]
        file: PathBuf,
        /// The importance file to write (safetensors).
        #[arg(short, long)]
        output: PathBuf,
        /// Tokens per window (each window starts from an empty cache).
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Memory the KV cache and buffers may take beyond the mapped model
        /// (e.g. 4G; default: what the OS reports available).
        #[arg(long, value_parser = nibble::model::memory::parse_bytes)]
        max_memory: Option<u64>,
    },
    /// Write a copy of a HuggingFace checkpoint with Gaussian noise of a
    /// quarter of the local Q4_1 step added to every matrix (moves weights
    /// that sit on a 4-bit grid off it, for honest quantization measurements).
    Perturb {
        input: PathBuf,
        /// The output directory.
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Show a .nbl file's header, metadata and tensor table.
    Inspect {
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check a .nbl file's structure and every tensor checksum.
    Verify { file: PathBuf },
    /// Write a HuggingFace checkpoint with official LLaMA-2 shapes and
    /// deterministic random weights.
    Synth {
        #[arg(long, value_enum)]
        preset: PresetArg,
        /// Output directory (created if missing).
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "f16")]
        dtype: DtypeArg,
    },
}

/// On Ctrl-C or SIGTERM, deletes the temporary file being written (every
/// output is written under a temporary name and renamed into place when
/// complete) and exits with 130: a command killed halfway leaves no partial
/// file, and an older file at the output path is left as it was. The
/// writers' own cleanup runs only when they are dropped, which an exit from
/// a signal never does.
fn remove_partial_output_on_interrupt() -> Result<(), ToolError> {
    ctrlc::set_handler(move || {
        let removed = nibble::fsutil::remove_unfinished();
        let what: Vec<String> = removed
            .iter()
            .map(|r| {
                let verb = if r.target_exists {
                    "was left unchanged"
                } else {
                    "was not written"
                };
                format!("{} {verb}", r.target.display())
            })
            .collect();
        if what.is_empty() {
            eprintln!("error: interrupted");
        } else {
            eprintln!(
                "error: interrupted; {} (the temporary file was removed)",
                what.join(", ")
            );
        }
        std::process::exit(130);
    })
    .map_err(|e| ToolError::named(format!("cannot install the Ctrl-C handler: {e}")))
}

/// Why a command ended early: an error to report, or standard output that
/// can no longer be written (a closed pipe, a full disk).
enum Failure {
    Tool(ToolError),
    Stdout(std::io::Error),
}

impl From<ToolError> for Failure {
    fn from(e: ToolError) -> Self {
        Self::Tool(e)
    }
}

/// Writes `text` to stdout and flushes it, returning write errors instead of
/// panicking as `print!` does.
fn emit(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(Failure::Stdout)
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Convert {
            input,
            output,
            quant,
            tensor_types,
            report,
            imatrix,
        } => {
            remove_partial_output_on_interrupt()?;
            let mut options = ConvertOptions::new(&input, &output, quant.into());
            options.overrides = tensor_types;
            options.imatrix = imatrix;
            options.progress = std::io::stderr().is_terminal();
            let summary = convert(&options)?;
            emit(&format!("wrote {}: {summary}\n", output.display()))?;
            if report {
                if !input.is_dir() {
                    return Err(ToolError::new(
                        &input,
                        "--report compares against a HuggingFace checkpoint directory",
                    )
                    .into());
                }
                let errors = nibble_tools::report::quantization_report(&input, &output)?;
                emit(&nibble_tools::report::Report(&errors).to_string())?;
            }
        }
        Command::Imatrix {
            model,
            file,
            output,
            ctx,
            max_memory,
        } => {
            nibble::model::set_memory_limit(max_memory);
            remove_partial_output_on_interrupt()?;
            let s = nibble_tools::imatrix::collect(
                &model,
                &file,
                ctx,
                &output,
                std::io::stderr().is_terminal(),
            )?;
            emit(&format!(
                "wrote {}: {} matrices, {} tokens, {:.1} s\n",
                output.display(),
                s.matrices,
                s.tokens,
                s.seconds
            ))?;
        }
        Command::Perturb {
            input,
            output,
            seed,
        } => {
            remove_partial_output_on_interrupt()?;
            nibble_tools::perturb::perturb(&input, &output, seed)?;
            emit(&format!("wrote {}\n", output.display()))?;
        }
        Command::Inspect { file, json } => {
            let nbl = inspect::open(&file)?;
            if json {
                let report = inspect::json_report(&file, &nbl);
                let json = serde_json::to_string_pretty(&report).expect("JSON values serialize");
                emit(&(json + "\n"))?;
            } else {
                emit(&inspect::text_report(&file, &nbl))?;
            }
        }
        Command::Verify { file } => {
            let s = inspect::verify(&file)?;
            emit(&format!(
                "OK: {}: {} tensors, {} bytes, structure and all checksums valid\n",
                file.display(),
                s.tensors,
                s.bytes
            ))?;
        }
        Command::Synth {
            preset,
            output,
            dtype,
        } => {
            let preset = match preset {
                PresetArg::Llama2_7b => Preset::Llama2_7b,
                PresetArg::Llama2_13b => Preset::Llama2_13b,
                PresetArg::Llama2_70b => Preset::Llama2_70b,
                PresetArg::Tiny => Preset::Tiny,
                PresetArg::Tiny256 => Preset::Tiny256,
            };
            let dtype = match dtype {
                DtypeArg::F16 => SynthDtype::F16,
                DtypeArg::Bf16 => SynthDtype::Bf16,
            };
            remove_partial_output_on_interrupt()?;
            let mut options = SynthOptions::new(preset, &output, dtype);
            options.progress = std::io::stderr().is_terminal();
            let s = synth(&options)?;
            emit(&format!(
                "wrote {}: {} tensors, {} parameters, {} shard(s), {:.1} GiB, {:.1} s\n",
                output.display(),
                s.tensors,
                s.parameters,
                s.shards,
                s.bytes as f64 / (1u64 << 30) as f64,
                s.seconds
            ))?;
        }
    }
    Ok(())
}

/// Exit status after a closed stdout pipe: what a shell reports for a
/// process killed by SIGPIPE (128 + 13), as `nibble` does.
const BROKEN_PIPE_EXIT: u8 = 141;

fn main() -> ExitCode {
    nibble::mapped_file_guard::install();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`| head`): nothing to say, and nobody to say
        // it to on stdout.
        Err(Failure::Stdout(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::from(BROKEN_PIPE_EXIT)
        }
        Err(Failure::Stdout(e)) => {
            eprintln!("error: <stdout>: {e}");
            ExitCode::FAILURE
        }
        Err(Failure::Tool(e)) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
