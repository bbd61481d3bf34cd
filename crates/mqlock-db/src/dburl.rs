//! Database URLs: which driver, and how to show them without the password.

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;

use crate::error::{Error, Result};

/// Connection options of a supported database, parsed from a URL.
#[derive(Debug, Clone)]
pub(crate) enum DbOptions {
    Postgres(PgConnectOptions),
    Sqlite(SqliteConnectOptions),
}

impl DbOptions {
    /// Parses `url`; the scheme chooses the driver (`postgres:`/`postgresql:` or `sqlite:`).
    pub(crate) fn parse(url: &str) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidUrl {
            url: redact(url),
            reason,
        };
        let Some((scheme, _)) = url.split_once(':') else {
            return Err(invalid(
                "no scheme; expected postgres://... or sqlite:...".into(),
            ));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "postgres" | "postgresql" => PgConnectOptions::from_str(url)
                .map(DbOptions::Postgres)
                .map_err(|e| invalid(e.to_string())),
            "sqlite" => SqliteConnectOptions::from_str(url)
                .map(DbOptions::Sqlite)
                .map_err(|e| invalid(e.to_string())),
            other => Err(invalid(format!(
                "unsupported scheme {other:?}; supported: postgres, postgresql, sqlite"
            ))),
        }
    }
}

/// Checks that `url` is a database URL this crate supports (`postgres://`, `postgresql://` or
/// `sqlite:`) and is well formed, without connecting.
pub fn validate_database_url(url: &str) -> Result<()> {
    DbOptions::parse(url).map(|_| ())
}

/// `url` with any password replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    // scheme://user:password@host... — only the part between the first ':' after "//" and the
    // last '@' before the path is secret.
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..start],
            &userinfo[..colon],
            &url[start + at..]
        ),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password_only() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db?x=1"),
            "postgres://u:***@h:5432/db?x=1"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite:///tmp/a.db"), "sqlite:///tmp/a.db");
        assert_eq!(redact("sqlite:a.db"), "sqlite:a.db");
    }

    #[test]
    fn schemes() {
        assert!(matches!(
            DbOptions::parse("postgres://u:p@127.0.0.1/db"),
            Ok(DbOptions::Postgres(_))
        ));
        assert!(matches!(
            DbOptions::parse("sqlite://x.db"),
            Ok(DbOptions::Sqlite(_))
        ));
        let err = DbOptions::parse("mysql://u:pw@h/db").unwrap_err();
        assert!(matches!(err, Error::InvalidUrl { .. }));
        assert!(!err.to_string().contains("pw"), "{err}");
        assert!(matches!(
            DbOptions::parse("just words"),
            Err(Error::InvalidUrl { .. })
        ));
        assert!(matches!(
            DbOptions::parse("postgres://u:p@h:notaport/db"),
            Err(Error::InvalidUrl { .. })
        ));
    }
}
