//! `ordo-source` binary: see the library crate.
fn main() -> std::process::ExitCode {
    ordo_runtime::app::run("ordo-source", ordo_source::run)
}
