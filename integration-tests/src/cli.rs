//! The `ordo` command-line tool as an operator runs it: the built binary
//! with arguments, its output echoed to the test's stderr (shown when a test
//! fails) and returned whole.

use std::process::Output;

use crate::process::binary;

/// Runs the built `ordo` binary with `args`, without the variables named in
/// `env_remove` (e.g. `ORDO_REDIS_URL`, so the developer's configuration
/// cannot stand in for a missing flag); echoes the command line, its stdout
/// and its stderr; returns its output.
///
/// # Panics
/// When the binary is not built, or cannot be run.
pub async fn ordo(args: &[&str], env_remove: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(binary("ordo"));
    command.args(args).kill_on_drop(true);
    for key in env_remove {
        command.env_remove(key);
    }
    let output = command.output().await.expect("the ordo CLI runs");
    eprintln!("$ ordo {}\n{}{}", args.join(" "), stdout(&output), stderr(&output));
    output
}

/// The output's stdout, as text (invalid UTF-8 replaced).
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The output's stderr, as text (invalid UTF-8 replaced).
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}
