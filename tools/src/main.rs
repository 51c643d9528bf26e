//! `nibble-tools`: the command line over the `nibble_tools` library.

use clap::{Parser, Subcommand, ValueEnum};
use nibble_tools::convert::{convert, ConvertOptions, QuantPolicy};
use nibble_tools::ToolError;
use std::io::IsTerminal;
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
}

impl From<Quant> for QuantPolicy {
    fn from(q: Quant) -> Self {
        match q {
            Quant::F32 => Self::F32,
            Quant::F16 => Self::F16,
            Quant::Q8 => Self::Q8,
            Quant::Q4 => Self::Q4,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Convert a HuggingFace LLaMA checkpoint directory into a .nbl file.
    Convert {
        /// Directory with config.json, tokenizer.json and *.safetensors.
        input: PathBuf,
        /// The .nbl file to write.
        #[arg(short, long)]
        output: PathBuf,
        /// Weight type policy (norms always stay f32; under q4 the output
        /// projection stays q8).
        #[arg(long, value_enum, default_value = "q4")]
        quant: Quant,
    },
}

fn run(cli: Cli) -> Result<(), ToolError> {
    match cli.command {
        Command::Convert {
            input,
            output,
            quant,
        } => {
            let mut options = ConvertOptions::new(input, &output, quant.into());
            options.progress = std::io::stderr().is_terminal();
            let summary = convert(&options)?;
            println!("wrote {}: {summary}", output.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
