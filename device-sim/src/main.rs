//! `device-sim`: see the library docs and `docs/architecture.md`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    device_sim::cli::main()
}
