//! `mqlock mount`: placeholder until the FUSE adapter lands (issue 3).

use std::process::ExitCode;

use clap::Args;

/// Options of `mqlock mount`.
#[derive(Args, Debug)]
pub struct MountArgs {}

pub async fn run(_args: MountArgs) -> ExitCode {
    eprintln!("mqlock mount: not available in this build yet");
    ExitCode::from(2)
}
