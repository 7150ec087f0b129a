//! `stateful-worker` binary: see the library crate.
fn main() -> std::process::ExitCode {
    ordo_runtime::app::run("stateful-worker", stateful_worker::run)
}
