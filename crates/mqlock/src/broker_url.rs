//! Broker URLs and the TLS settings of a connection: what a URL list means before any
//! connection is opened.

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri};

use crate::config::ClientConfig;
use crate::error::Error;

/// A broker address as shown in messages: `host:port[/vhost]`, never the credentials.
pub(crate) fn display_addr(uri: &AMQPUri) -> String {
    match uri.vhost.as_str() {
        "/" | "" => format!("{}:{}", uri.authority.host, uri.authority.port),
        vhost => format!("{}:{}/{vhost}", uri.authority.host, uri.authority.port),
    }
}

/// Parses a comma-separated list of broker URLs, applying the configured heartbeat.
pub(crate) fn parse_urls(urls: &str, config: &ClientConfig) -> Result<Vec<AMQPUri>, Error> {
    let mut out = Vec::new();
    for (i, raw) in urls.split(',').map(str::trim).enumerate() {
        if raw.is_empty() {
            continue;
        }
        // The parser's message never repeats the URL, so the password cannot leak through it.
        let mut uri: AMQPUri = raw.parse().map_err(|e: String| Error::InvalidUrl {
            reason: format!(
                "URL #{} of {urls_count}: {e}",
                i + 1,
                urls_count = urls.split(',').count()
            ),
        })?;
        if uri.authority.host.is_empty() {
            return Err(Error::InvalidUrl {
                reason: format!("URL #{}: no host", i + 1),
            });
        }
        if uri.scheme == AMQPScheme::AMQPS && !cfg!(feature = "rustls") {
            return Err(Error::Config(format!(
                "URL #{} is amqps:// but this build of mqlock has no TLS support (enable the \"rustls\" cargo feature)",
                i + 1
            )));
        }
        uri.query.heartbeat = Some(config.heartbeat_secs());
        uri.query.connection_timeout.get_or_insert(5_000);
        out.push(uri);
    }
    if out.is_empty() {
        return Err(Error::InvalidUrl {
            reason: "no broker URL given".into(),
        });
    }
    Ok(out)
}

/// The TLS settings of one connection: the CA and client certificate files of the
/// configuration, read at every connection (so renewed files are picked up on reconnect).
pub(crate) fn tls_config(uri: &AMQPUri, config: &ClientConfig) -> Result<OwnedTLSConfig, Error> {
    let mut tls = OwnedTLSConfig::default();
    if uri.scheme != AMQPScheme::AMQPS {
        return Ok(tls);
    }
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| Error::Config(format!("cannot read the {what} {}: {e}", path.display())))
    };
    // With a CA file, only that CA is trusted; without one, the system's CA bundle.
    let ca = match &config.tls.ca_cert {
        Some(path) => Some(path.clone()),
        None => system_ca_bundle(),
    };
    if let Some(path) = &ca {
        let pem = read("CA certificate", path)?;
        let pem = String::from_utf8(pem).map_err(|_| {
            Error::Config(format!(
                "the CA certificate {} is not a PEM file",
                path.display()
            ))
        })?;
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(Error::Config(format!(
                "the CA certificate {} holds no PEM certificate",
                path.display()
            )));
        }
        tls.cert_chain = Some(pem);
    }
    if let (Some(cert), Some(key)) = (&config.tls.client_cert, &config.tls.client_key) {
        tls.identity = Some(OwnedIdentity::PKCS8 {
            pem: read("client certificate", cert)?,
            key: read("client key", key)?,
        });
    }
    Ok(tls)
}

/// The system's CA bundle: `$SSL_CERT_FILE`, or the first of the usual locations that exists.
fn system_ca_bundle() -> Option<std::path::PathBuf> {
    if let Some(f) = std::env::var_os("SSL_CERT_FILE") {
        return Some(f.into());
    }
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ]
    .iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_never_carry_credentials() {
        let config = ClientConfig::default();
        let uris = parse_urls(
            "amqp://u:pw-secret@h1:5672/%2f, amqp://u:pw-secret@h2:5671/prod",
            &config,
        )
        .unwrap();
        assert_eq!(display_addr(&uris[0]), "h1:5672");
        assert_eq!(display_addr(&uris[1]), "h2:5671/prod");
        let err = parse_urls("amqp://u:pw-secret@h1:x/%2f", &config).unwrap_err();
        assert!(!format!("{err} {err:?}").contains("pw-secret"), "{err:?}");
    }

    #[test]
    fn tls_settings_apply_to_amqps_only() {
        let config = ClientConfig {
            tls: crate::config::TlsConfig {
                ca_cert: Some("/nonexistent/ca.pem".into()),
                ..Default::default()
            },
            ..ClientConfig::default()
        };
        let plain = parse_urls("amqp://h:5672/%2f", &config).unwrap();
        assert_eq!(
            tls_config(&plain[0], &config).unwrap(),
            OwnedTLSConfig::default()
        );
        let parsed = parse_urls("amqps://u:pw-secret@h:5671/%2f", &config);
        if cfg!(feature = "rustls") {
            let tls = parsed.unwrap();
            let err = tls_config(&tls[0], &config).unwrap_err();
            assert!(
                matches!(&err, Error::Config(m) if m.contains("/nonexistent/ca.pem")),
                "{err:?}"
            );
        } else {
            // Without TLS support an amqps URL is refused up front, saying how to get it.
            let err = parsed.unwrap_err();
            assert!(
                matches!(&err, Error::Config(m) if m.contains("rustls") && !m.contains("pw-secret")),
                "{err:?}"
            );
        }
    }
}
