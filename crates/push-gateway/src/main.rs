//! `push-gateway` binary: see the library crate.
fn main() -> std::process::ExitCode {
    ordo_runtime::app::run("push-gateway", push_gateway::run)
}
