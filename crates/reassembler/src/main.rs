//! `reassembler` binary: see the library crate.
fn main() -> std::process::ExitCode {
    ordo_runtime::app::run("reassembler", reassembler::run)
}
