//! `mqlock list`: every lock at a glance.
//!
//! AMQP cannot enumerate queues, so the lock queues are found through the broker's management
//! API (the `rabbitmq_management` plugin); each lock's state and holder then come from the
//! broker over AMQP, exactly as `mqlock status` reads them.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::connect::ConnectArgs;
use crate::exit_code::{FAILURE, OK};
use crate::status::status_json;

/// List every lock (under --prefix) with its state, holder, waiters and age, sorted by name.
///
/// Needs the broker's management API (the rabbitmq_management plugin) to find the locks: by
/// default at http://HOST:15672 of the first --url, with that URL's user and password; the
/// user needs the "monitoring" (or "management") tag.
///
/// Examples:
///   mqlock list
///   mqlock list billing/ --json
///   mqlock list --management-url http://ops:secret@rabbit1:15672
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct ListArgs {
    /// Only locks whose name starts with this (e.g. "billing/").
    pub name_prefix: Option<String>,

    /// Print a JSON array of `mqlock status --json` objects instead of a table.
    #[arg(long)]
    pub json: bool,

    /// The management API: http://[USER:PASSWORD@]HOST:PORT (default: the first --url's host,
    /// port 15672, and its credentials).
    #[arg(long, env = "MQLOCK_MANAGEMENT_URL", hide_env_values = true)]
    pub management_url: Option<String>,

    /// Show mqlock's and the AMQP library's logs on stderr (debug level; MQLOCK_LOG or RUST_LOG,
    /// when set, choose instead).
    #[arg(long, short = 'v')]
    pub verbose: bool,

    #[command(flatten)]
    pub connect: ConnectArgs,
}

pub async fn run(args: ListArgs) -> ExitCode {
    match list(&args).await {
        Ok(()) => ExitCode::from(OK),
        Err(e) => {
            eprintln!("mqlock: {e}");
            ExitCode::from(FAILURE)
        }
    }
}

async fn list(args: &ListArgs) -> Result<(), String> {
    let amqp = Endpoint::parse(args.connect.url.split(',').next().unwrap_or_default(), 5672)
        .map_err(|e| format!("cannot read --url: {e}"))?;
    let api = match &args.management_url {
        Some(url) => Endpoint::parse(url, 15672).map_err(|e| format!("--management-url: {e}"))?,
        None => Endpoint {
            port: 15672,
            ..amqp.clone()
        },
    };
    let queues = api.queues(&amqp.vhost).await?;
    let kind = format!("{}lock:", args.connect.prefix);
    let mut names: Vec<String> = queues
        .iter()
        .filter_map(|q| q.strip_prefix(&kind).map(str::to_owned))
        .filter(|n| args.name_prefix.as_deref().is_none_or(|p| n.starts_with(p)))
        .collect();
    names.sort();
    let client = args.connect.connect().await.map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for name in &names {
        // Names longer than a queue name allows are stored with a hash; they cannot be read
        // back, and are listed by their queue name.
        let status = client.status(name).await.map_err(|e| e.to_string())?;
        rows.push(status);
    }
    client.close().await;
    if args.json {
        let all: Vec<_> = rows.iter().map(status_json).collect();
        println!("{}", serde_json::Value::Array(all));
        return Ok(());
    }
    if rows.is_empty() {
        println!(
            "no locks under {:?} at {}",
            args.connect.prefix,
            api.display()
        );
        return Ok(());
    }
    println!(
        "{:<32} {:<5} {:>7}  {:<9} HOLDER",
        "LOCK", "STATE", "WAITING", "AGE"
    );
    for s in &rows {
        let age = s
            .holder
            .as_ref()
            .and_then(|h| SystemTime::now().duration_since(h.since).ok())
            .map(short_duration)
            .unwrap_or_else(|| "-".into());
        let holder = match (&s.holder, s.is_held()) {
            (Some(h), true) => format!("pid {} on {}, token {}", h.pid, h.host, h.token),
            (Some(h), false) => format!("(last: pid {} on {})", h.pid, h.host),
            (None, true) => "(not recorded)".into(),
            (None, false) => "-".into(),
        };
        println!(
            "{:<32} {:<5} {:>7}  {:<9} {}",
            s.name,
            if s.is_held() { "held" } else { "free" },
            s.waiters(),
            age,
            holder
        );
    }
    Ok(())
}

fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

/// Where a broker answers: host, port, credentials and vhost, from an AMQP or HTTP URL.
#[derive(Debug, Clone)]
struct Endpoint {
    host: String,
    port: u16,
    user: String,
    password: String,
    vhost: String,
}

impl Endpoint {
    /// `scheme://[user[:password]@]host[:port][/vhost]`; the default user is guest.
    fn parse(url: &str, default_port: u16) -> Result<Endpoint, String> {
        let url = url.trim();
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| "expected scheme://host".to_string())?;
        if scheme == "https" {
            return Err(
                "https is not supported for the management API; give an http:// --management-url"
                    .into(),
            );
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((u, p)) => (percent_decode(u), percent_decode(p)),
                None => (percent_decode(u), String::new()),
            },
            None => ("guest".into(), "guest".into()),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h.to_owned(),
                p.parse().map_err(|_| format!("bad port {p:?}"))?,
            ),
            None => (hostport.to_owned(), default_port),
        };
        if host.is_empty() {
            return Err("no host".into());
        }
        let path = path.split(['?', '#']).next().unwrap_or_default();
        let vhost = match percent_decode(path) {
            v if v.is_empty() => "/".into(),
            v => v,
        };
        Ok(Endpoint {
            host,
            port,
            user,
            password,
            vhost,
        })
    }

    fn display(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// The names of every queue of `vhost`, from `GET /api/queues/VHOST?columns=name`.
    async fn queues(&self, vhost: &str) -> Result<Vec<String>, String> {
        let path = format!("/api/queues/{}?columns=name", percent_encode(vhost));
        let body = self.get(&path).await?;
        let value: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| format!("the management API at {} sent no JSON: {e}", self.display()))?;
        Ok(value
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|q| q["name"].as_str().map(str::to_owned))
            .collect())
    }

    /// One HTTP/1.0 GET (no chunked encoding, the server closes the connection at the end).
    async fn get(&self, path: &str) -> Result<Vec<u8>, String> {
        let unreachable = |e: std::io::Error| {
            format!(
                "cannot reach the management API at {} ({e}); is the rabbitmq_management plugin enabled? (or give --management-url)",
                self.display()
            )
        };
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(unreachable)?;
            let auth = base64(format!("{}:{}", self.user, self.password).as_bytes());
            let request = format!(
                "GET {path} HTTP/1.0\r\nHost: {}:{}\r\nAuthorization: Basic {auth}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
                self.host, self.port
            );
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(unreachable)?;
            let mut response = Vec::new();
            stream
                .read_to_end(&mut response)
                .await
                .map_err(unreachable)?;
            Ok::<_, String>(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .map_err(|_| {
                format!(
                    "the management API at {} did not answer within 30 s",
                    self.display()
                )
            })??;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| format!("a malformed HTTP answer from {}", self.display()))?;
        let head = String::from_utf8_lossy(&response[..split]);
        let status_line = head.lines().next().unwrap_or_default();
        let code: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        match code {
            200 => Ok(response[split + 4..].to_vec()),
            401 => Err(format!(
                "the management API at {} refused user {:?} (401): it needs the \"monitoring\" or \"management\" tag",
                self.display(),
                self.user
            )),
            _ => Err(format!(
                "the management API at {} answered {status_line:?}",
                self.display()
            )),
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_come_from_amqp_and_http_urls() {
        let e = Endpoint::parse("amqp://u:p%40ss@rabbit1:5673/%2f", 5672).unwrap();
        assert_eq!(
            (
                e.host.as_str(),
                e.port,
                e.user.as_str(),
                e.password.as_str(),
                e.vhost.as_str()
            ),
            ("rabbit1", 5673, "u", "p@ss", "/")
        );
        let e = Endpoint::parse("http://ops:x@h", 15672).unwrap();
        assert_eq!(
            (e.port, e.user.as_str(), e.vhost.as_str()),
            (15672, "ops", "/")
        );
        let e = Endpoint::parse("amqp://h/prod", 5672).unwrap();
        assert_eq!((e.user.as_str(), e.vhost.as_str()), ("guest", "prod"));
        assert!(Endpoint::parse("h:15672", 15672).is_err());
        assert!(Endpoint::parse("https://h:15671", 15672).is_err());
    }

    #[test]
    fn base64_and_percent_encoding() {
        assert_eq!(base64(b"guest:guest"), "Z3Vlc3Q6Z3Vlc3Q=");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
        assert_eq!(percent_encode("/"), "%2F");
        assert_eq!(percent_decode("%2f"), "/");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
