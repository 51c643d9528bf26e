//! Prints `convert --report`'s per-tensor quantization error for an existing
//! `.nbl` against the checkpoint it came from (e.g. one converted by an older
//! quantizer): `cargo run --release -p nibble-tools --example quant_report -- HF_DIR FILE.nbl`.

use nibble_tools::report::{quantization_report, Report};
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [hf, nbl] = &args[..] else {
        eprintln!("usage: quant_report HF_DIR FILE.nbl");
        return ExitCode::FAILURE;
    };
    match quantization_report(hf, nbl) {
        Ok(errors) => {
            print!("{}", Report(&errors));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
