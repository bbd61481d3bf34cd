//! `mqlock completions SHELL` and `mqlock man`: shell completions and a man page, generated
//! from the same clap definitions as `--help`, so they never drift from the command.

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, CommandFactory};
use clap_complete::Shell;

use crate::exit_code::{FAILURE, OK};

/// Print a shell completion script.
///
/// Example: mqlock completions bash > /etc/bash_completion.d/mqlock
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    pub shell: Shell,
}

/// Print the man page (roff) of mqlock and its subcommands.
///
/// Example: mqlock man > /usr/local/share/man/man1/mqlock.1
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct ManArgs {}

pub fn completions(args: CompletionsArgs) -> ExitCode {
    let mut cmd = crate::Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "mqlock", &mut std::io::stdout());
    ExitCode::from(OK)
}

pub fn man(_: ManArgs) -> ExitCode {
    let cmd = crate::Cli::command();
    let mut page = Vec::new();
    let rendered = clap_mangen::Man::new(cmd.clone())
        .render(&mut page)
        .and_then(|()| {
            // One page for the whole tool: each subcommand's own page follows the main one.
            for sub in cmd.get_subcommands() {
                // clap wants a 'static name; this runs once per subcommand in a process that prints
                // and exits.
                let name: &'static str =
                    Box::leak(format!("mqlock-{}", sub.get_name()).into_boxed_str());
                let sub = sub.clone().name(name);
                clap_mangen::Man::new(sub).render(&mut page)?;
            }
            std::io::stdout().write_all(&page)
        });
    match rendered {
        Ok(()) => ExitCode::from(OK),
        Err(e) => {
            eprintln!("mqlock: cannot write the man page: {e}");
            ExitCode::from(FAILURE)
        }
    }
}
