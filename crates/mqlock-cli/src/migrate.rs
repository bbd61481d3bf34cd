//! `mqlock migrate`: placeholder until the database adapter lands (issue 5).

use std::process::ExitCode;

use clap::Args;

/// Options of `mqlock migrate`.
#[derive(Args, Debug)]
pub struct MigrateArgs {}

pub async fn run(_args: MigrateArgs) -> ExitCode {
    eprintln!("mqlock migrate: not available in this build yet");
    ExitCode::from(2)
}
