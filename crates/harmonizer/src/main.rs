//! `harmonizer` binary: see the library crate.
fn main() -> std::process::ExitCode {
    ordo_runtime::app::run("harmonizer", harmonizer::run)
}
