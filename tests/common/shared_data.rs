//! Whether the `../shared` folder beside the repository is there: the root
//! crate's and the converter's integration tests both include this file.
//!
//! In a bare clone without it, a test that needs its data calls
//! [`have_shared`] first and returns when it is false. The skip and its
//! reason go straight to the terminal (the test harness captures only
//! `print!`), so a green run says what it did not test. `scripts/test.sh`
//! sets [`REQUIRE_SHARED_ENV`], which turns a missing `../shared` into a
//! failure.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Set (to anything) to make a missing `../shared` fail the tests that need it.
pub const REQUIRE_SHARED_ENV: &str = "NIBBLE_REQUIRE_SHARED";

/// The script that builds the real SmolLM2 checkpoint, relative to `repo`.
pub fn smollm2_script(repo: &Path) -> PathBuf {
    repo.join("../shared/models/smollm2-135m/make.sh")
}

/// True when the SmolLM2 build script is beside `repo`; otherwise reports
/// the current test as skipped (or panics under [`REQUIRE_SHARED_ENV`]).
pub fn have_shared(repo: &Path) -> bool {
    let script = smollm2_script(repo);
    if script.is_file() {
        return true;
    }
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    assert!(
        std::env::var_os(REQUIRE_SHARED_ENV).is_none(),
        "{test}: {} is missing and {REQUIRE_SHARED_ENV} is set",
        script.display()
    );
    let _ = writeln!(
        std::io::stderr().lock(),
        "skipped {test}: it needs SmolLM2, built by {} (no ../shared beside the repository; \
         {REQUIRE_SHARED_ENV}=1 makes this a failure)",
        script.display()
    );
    false
}
