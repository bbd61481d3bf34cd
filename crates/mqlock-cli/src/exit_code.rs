//! The exit codes of every `mqlock` subcommand, in one table.
//!
//! Every subcommand returns one of these constants, maps errors through [`lock_error`] (the
//! core's errors, the same code in every subcommand) or [`db_error`] (`mqlock migrate`), and
//! shows its rows of [`ROWS`] in its `--help` and man page ([`help`]); `mqlock --help` shows the
//! whole table. The same condition gives the same code everywhere: a broker that cannot be
//! reached (or refuses the login, or fails the TLS handshake) is [`FAILURE`] in every
//! subcommand, a lock lost [`LOST`], a wait that gave up [`TIMEOUT`].
//!
//! Code 4 is not used: `mqlock migrate` exited 4 for an unreachable broker before it joined
//! this table; it exits [`FAILURE`] now, like every other subcommand.

/// Success. `status`: the lock is free. `exec`: CMD's own status is passed through, so 0 is
/// CMD's success.
pub const OK: u8 = 0;
/// `status`: the lock is held.
pub const HELD: u8 = 1;
/// `migrate`: a migration failed; it was rolled back as far as the database allows and the
/// lock released.
pub const MIGRATION_FAILED: u8 = 1;
/// `mount`: the mount cannot be set up (bad paths, the metrics address, mounting refused).
pub const MOUNT_SETUP: u8 = 1;
/// Bad input. Every subcommand: a usage error found by the argument parser (clap's code).
/// `migrate`: also what it checks before contacting anything — the database URL, the
/// migrations directory, the lock name and the broker URL.
pub const BAD_INPUT: u8 = 2;
/// `migrate`: the database is unreachable, or a statement outside the migrations failed.
pub const DATABASE: u8 = 3;
/// `migrate`: the migration history in the database does not match the directory.
pub const MIGRATION_HISTORY: u8 = 5;
/// mqlock itself failed: the broker is unreachable or refused the connection (TLS, login,
/// access), the management API cannot be reached, an output cannot be written... In `exec`,
/// `status`, `break` and `list` also a lock name or broker URL that mqlock refuses.
pub const FAILURE: u8 = 122;
/// The lock was lost: `exec` terminated CMD; `migrate` did not start the next migration.
pub const LOST: u8 = 123;
/// The wait for the lock gave up: `exec --timeout`, `exec --nonblock` finding it held,
/// `migrate --timeout`.
pub const TIMEOUT: u8 = 124;
/// `exec`: CMD cannot be executed.
pub const CANNOT_EXEC: u8 = 126;
/// `exec`: CMD was not found.
pub const NOT_FOUND: u8 = 127;
/// `exec`: interrupted (SIGINT) while waiting for the lock (128 + SIGINT).
pub const INTERRUPTED: u8 = 130;
/// `exec`: terminated (SIGTERM) while waiting for the lock (128 + SIGTERM).
pub const TERMINATED: u8 = 143;

/// One line of the table: a code, the subcommands it applies to (empty: every subcommand),
/// and what it means there.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    /// The exit code.
    pub code: u8,
    /// The subcommands that use the code with this meaning; empty for every subcommand.
    pub commands: &'static [&'static str],
    /// What it means.
    pub meaning: &'static str,
}

/// Every exit code of `mqlock`, by code. `exec` passes CMD's own status through, so it can also
/// exit with any code CMD returns (128+N if CMD was killed by signal N).
pub const ROWS: &[Row] = &[
    Row {
        code: OK,
        commands: &[],
        meaning: "success",
    },
    Row {
        code: OK,
        commands: &["status"],
        meaning: "the lock is free",
    },
    Row {
        code: OK,
        commands: &["break"],
        meaning: "the request was sent, or there was nothing to break (the message says which)",
    },
    Row {
        code: OK,
        commands: &["mount"],
        meaning: "unmounted (SIGINT, SIGTERM or fusermount3 -u)",
    },
    Row {
        code: OK,
        commands: &["migrate"],
        meaning: "the schema is up to date (applied by this process or by another replica)",
    },
    Row {
        code: OK,
        commands: &["elect"],
        meaning: "--observe: interrupted (SIGINT or SIGTERM); otherwise CMD exited with 0",
    },
    Row {
        code: HELD,
        commands: &["status"],
        meaning: "the lock is held",
    },
    Row {
        code: MIGRATION_FAILED,
        commands: &["migrate"],
        meaning: "a migration failed: it was rolled back (as far as the database's \
                  transactional DDL allows), the lock was released, and the failing version \
                  and error are printed",
    },
    Row {
        code: MOUNT_SETUP,
        commands: &["mount"],
        meaning: "the mount cannot be set up: bad paths, the metrics address, mounting refused",
    },
    Row {
        code: BAD_INPUT,
        commands: &[],
        meaning: "usage error (unknown option, missing argument...)",
    },
    Row {
        code: BAD_INPUT,
        commands: &["migrate"],
        meaning: "bad input: malformed or unsupported database URL, missing migrations \
                  directory, invalid lock name or broker URL, or a usage error",
    },
    Row {
        code: DATABASE,
        commands: &["migrate"],
        meaning: "the database is unreachable or refused the connection",
    },
    Row {
        code: MIGRATION_HISTORY,
        commands: &["migrate"],
        meaning: "the migration history does not match the directory (a migration applied \
                  earlier was edited or removed, or a previous run left it half applied)",
    },
    Row {
        code: FAILURE,
        commands: &[],
        meaning: "mqlock failed: the broker is unreachable or refused the connection (TLS, \
                  login, access), or another error of mqlock itself",
    },
    Row {
        code: FAILURE,
        commands: &["exec", "elect", "status", "break", "list"],
        meaning: "mqlock failed: the broker is unreachable or refused the connection (TLS, \
                  login, access), an invalid lock name or broker URL, or another error of \
                  mqlock itself",
    },
    Row {
        code: LOST,
        commands: &["exec"],
        meaning: "the lock was lost while CMD ran: CMD got SIGTERM, then SIGKILL after --grace (or CMD had already exited when a frozen mqlock resumed past its lease)",
    },
    Row {
        code: LOST,
        commands: &["elect"],
        meaning: "leadership was lost while CMD ran: CMD got SIGTERM, then SIGKILL after --grace (or CMD had already exited when a frozen mqlock resumed past its lease)",
    },
    Row {
        code: LOST,
        commands: &["migrate"],
        meaning: "the lock was lost during the run; later migrations were not started",
    },
    Row {
        code: TIMEOUT,
        commands: &["exec"],
        meaning: "the wait timed out (--timeout), or --nonblock found the lock held",
    },
    Row {
        code: TIMEOUT,
        commands: &["migrate"],
        meaning: "timed out waiting for the lock (--timeout)",
    },
    Row {
        code: CANNOT_EXEC,
        commands: &["exec", "elect"],
        meaning: "CMD cannot be executed",
    },
    Row {
        code: NOT_FOUND,
        commands: &["exec", "elect"],
        meaning: "CMD not found",
    },
    Row {
        code: INTERRUPTED,
        commands: &["exec"],
        meaning: "interrupted (SIGINT) while waiting for the lock",
    },
    Row {
        code: INTERRUPTED,
        commands: &["elect"],
        meaning: "interrupted (SIGINT) while standing by",
    },
    Row {
        code: TERMINATED,
        commands: &["exec"],
        meaning: "terminated (SIGTERM) while waiting for the lock",
    },
    Row {
        code: TERMINATED,
        commands: &["elect"],
        meaning: "terminated (SIGTERM) while standing by",
    },
];

/// The exit-code section of a `--help` text and man page: the rows of `command` (a
/// subcommand's name; a row naming it replaces the row for every subcommand with the same
/// code), or the whole table with each row's subcommands for `None`.
pub fn help(command: Option<&str>) -> String {
    let mut out = String::from("Exit codes:");
    if matches!(command, Some("exec" | "elect")) {
        out.push_str(
            "\n    CMD's own status (128+N if CMD was killed by signal N), or mqlock's own:",
        );
    }
    for row in ROWS {
        let scope = match command {
            None if row.commands.is_empty() => String::new(),
            None => format!("{}: ", row.commands.join(", ")),
            Some(c) if row.commands.contains(&c) => String::new(),
            Some(c)
                if row.commands.is_empty()
                    && !ROWS
                        .iter()
                        .any(|r| r.code == row.code && r.commands.contains(&c)) =>
            {
                String::new()
            }
            Some(_) => continue,
        };
        push_wrapped(
            &mut out,
            &format!("{:<4} ", row.code),
            &format!("{scope}{}", row.meaning),
        );
    }
    if command.is_none() {
        push_wrapped(
            &mut out,
            "",
            "exec and elect also exit with CMD's own status (128+N if CMD was killed by signal N)",
        );
    }
    out
}

/// Appends `lead` (the code column) and `text`, indented by 4 and wrapped at 92 columns with
/// continuation lines under the text (clap wraps again only on a narrower terminal).
fn push_wrapped(out: &mut String, lead: &str, text: &str) {
    const WIDTH: usize = 92;
    let indent = 4 + lead.len();
    let mut current = format!("    {lead}");
    let mut empty = true;
    for word in text.split_whitespace() {
        if !empty && current.len() + 1 + word.len() > WIDTH {
            out.push('\n');
            out.push_str(&current);
            current = " ".repeat(indent);
            empty = true;
        }
        if !empty {
            current.push(' ');
        }
        current.push_str(word);
        empty = false;
    }
    out.push('\n');
    out.push_str(&current);
}

/// The code for an error of the core, the same in every subcommand: [`TIMEOUT`] for a wait
/// that gave up, [`LOST`] for a lock lost, [`FAILURE`] for everything else (broker unreachable,
/// TLS, login or access refused, an invalid name...).
pub fn lock_error(e: &mqlock::Error) -> u8 {
    match e {
        mqlock::Error::Timeout { .. } => TIMEOUT,
        mqlock::Error::Lost { .. } => LOST,
        _ => FAILURE,
    }
}

/// The code `mqlock migrate` exits with for `e`.
pub fn db_error(e: &mqlock_db::Error) -> u8 {
    use mqlock_db::Error;
    match e {
        Error::MigrationFailed { .. } => MIGRATION_FAILED,
        Error::InvalidUrl { .. } | Error::MigrationSource { .. } => BAD_INPUT,
        Error::Connect { .. } | Error::Database { .. } => DATABASE,
        Error::MigrationHistory(_) => MIGRATION_HISTORY,
        Error::LostBeforeCommit { .. } => LOST,
        // `migrate` checks its input (lock name, broker URL, configuration) before it contacts
        // anything and reports it as bad input, like the database URL; every other lock error
        // has the code it has in every subcommand.
        Error::Lock(
            mqlock::Error::InvalidName { .. }
            | mqlock::Error::InvalidUrl { .. }
            | mqlock::Error::Config(_),
        ) => BAD_INPUT,
        Error::Lock(l) => lock_error(l),
        _ => DATABASE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUBCOMMANDS: &[&str] = &[
        "exec",
        "elect",
        "status",
        "list",
        "break",
        "completions",
        "man",
        "mount",
        "migrate",
    ];

    #[test]
    fn rows_name_real_subcommands_and_one_meaning_per_code_and_subcommand() {
        for (i, row) in ROWS.iter().enumerate() {
            for c in row.commands {
                assert!(SUBCOMMANDS.contains(c), "row {i} names {c:?}");
            }
            for other in &ROWS[i + 1..] {
                if other.code != row.code {
                    continue;
                }
                // A subcommand's row may refine the row for every subcommand, not repeat
                // itself.
                let overlap = row.commands.iter().any(|c| other.commands.contains(c))
                    || (row.commands.is_empty() && other.commands.is_empty());
                assert!(!overlap, "code {} twice for one subcommand", row.code);
            }
        }
        // Sorted by code, so `--help` reads in order.
        assert!(ROWS.windows(2).all(|w| w[0].code <= w[1].code));
    }

    #[test]
    fn every_constant_is_in_the_table_and_4_is_not() {
        for code in [
            OK,
            HELD,
            MIGRATION_FAILED,
            MOUNT_SETUP,
            BAD_INPUT,
            DATABASE,
            MIGRATION_HISTORY,
            FAILURE,
            LOST,
            TIMEOUT,
            CANNOT_EXEC,
            NOT_FOUND,
            INTERRUPTED,
            TERMINATED,
        ] {
            assert!(ROWS.iter().any(|r| r.code == code), "{code} not in ROWS");
        }
        assert!(ROWS.iter().all(|r| r.code != 4));
    }

    #[test]
    fn an_unreachable_broker_is_122_in_migrate_as_everywhere() {
        let down = mqlock::Error::Unreachable {
            addr: "127.0.0.1:1".into(),
            detail: "connection refused".into(),
        };
        assert_eq!(lock_error(&down), FAILURE);
        assert_eq!(db_error(&mqlock_db::Error::Lock(down)), FAILURE);
        let refused = mqlock::Error::AuthRefused {
            addr: "127.0.0.1:5672".into(),
            user: "guest".into(),
        };
        assert_eq!(db_error(&mqlock_db::Error::Lock(refused)), FAILURE);
    }

    #[test]
    fn timeouts_and_losses_have_one_code_each() {
        let timeout = mqlock::Error::Timeout {
            name: "n".into(),
            addr: "a".into(),
            waited: std::time::Duration::from_secs(1),
        };
        assert_eq!(lock_error(&timeout), TIMEOUT);
        assert_eq!(db_error(&mqlock_db::Error::Lock(timeout)), TIMEOUT);
        let lost = mqlock::Error::Lost {
            name: "n".into(),
            reason: mqlock::LossReason::Revoked,
        };
        assert_eq!(lock_error(&lost), LOST);
        assert_eq!(db_error(&mqlock_db::Error::Lock(lost)), LOST);
        let bad = mqlock::Error::InvalidName {
            name: String::new(),
            reason: "empty",
        };
        assert_eq!(lock_error(&bad), FAILURE);
        assert_eq!(db_error(&mqlock_db::Error::Lock(bad)), BAD_INPUT);
    }

    #[test]
    fn help_lists_a_subcommands_codes_and_the_whole_table() {
        let migrate = help(Some("migrate"));
        for code in ["0 ", "1 ", "2 ", "3 ", "5 ", "122", "123", "124"] {
            assert!(
                migrate.contains(&format!("\n    {code}")),
                "{code}: {migrate}"
            );
        }
        assert!(!migrate.contains("\n    4 "), "{migrate}");
        assert_eq!(migrate.matches("\n    2 ").count(), 1, "{migrate}");
        assert!(!migrate.contains("usage error (unknown"), "{migrate}");
        assert!(!migrate.contains("CMD"), "{migrate}");
        let status = help(Some("status"));
        assert!(status.contains("the lock is held") && !status.contains("migration"));
        let all = help(None);
        for code in ROWS.iter().map(|r| r.code) {
            assert!(all.contains(&format!("\n    {code:<4} ")), "{code}: {all}");
        }
        assert!(all.contains("migrate: a migration failed"), "{all}");
        assert!(all.lines().all(|l| l.len() <= 92), "{all}");
    }
}
