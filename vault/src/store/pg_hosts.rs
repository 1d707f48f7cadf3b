//! libpq-style host lists in a PostgreSQL URL:
//! `postgres://user:secret@db1:5432,db2:5433/cardvault?sslmode=verify-full`
//! names a primary and its standbys; everything but the hosts (user,
//! password, database, parameters) is shared. sqlx takes one host per
//! connection, so [`parse`] turns such a URL into one single-host URL per
//! host, in the order given, for `PgConnectOptions::from_str`.
//!
//! `target_session_attrs` is read here and never reaches sqlx: the service
//! writes on every operation (reads append an audit event), so a host list
//! always means "the host that accepts writes", and only `read-write` (or
//! `primary`, the same thing here) may be asked for explicitly. A single
//! host with `target_session_attrs=read-write` is checked the same way.
//!
//! Errors name the position of the host at fault and never repeat the URL
//! (it may hold a password).

use std::fmt;

/// The parameter read (and removed) here.
const TARGET_SESSION_ATTRS: &str = "target_session_attrs";

/// What is wrong with a database URL's host list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostListError {
    #[error("database URL: not a postgres:// or postgresql:// URL")]
    Scheme,
    /// Position of the host in the list, from 1.
    #[error("database URL: host {0} of the list is empty")]
    EmptyHost(usize),
    /// A character that has no place in a host name, an IPv6 address
    /// without brackets, or an unclosed bracket.
    #[error("database URL: host {0} of the list is not a host name, an IPv4 address or a bracketed IPv6 address")]
    BadHost(usize),
    #[error("database URL: the port of host {0} is not a number from 1 to 65535")]
    BadPort(usize),
    /// `host=`, `hostaddr=` or `port=` parameters with a list: name the
    /// hosts in the URL's authority instead.
    #[error("database URL: list several hosts before the path (host1:port1,host2:port2), not in a host, hostaddr or port parameter")]
    ListInParameter,
    #[error("database URL: target_session_attrs must be read-write (or primary): the service writes on every operation")]
    TargetSessionAttrs,
    /// An `@` after the first `/`, `?` or `#`: a user name or password
    /// holding one of those characters unencoded (the URL cannot be split,
    /// and a part of the password would be taken for the host).
    #[error("database URL: percent-encode '/', '?', '#' and '@' in the user name and password")]
    UnencodedUserinfo,
}

/// The single-host URLs of a database URL, in order.
#[derive(Clone, PartialEq, Eq)]
pub struct HostList {
    /// One `postgres://` URL per host (with the password, if any: never
    /// shown by `Debug`).
    urls: Vec<String>,
    /// Each host's `host:port` as written (port as given, if any), for logs.
    names: Vec<String>,
    /// `target_session_attrs=read-write` (or `primary`) was given.
    read_write: bool,
}

impl HostList {
    /// The single-host URLs, in the order of the list.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// `host[:port]` of each host, as written (no credentials): for logs.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Whether every connection must be checked to accept writes: with
    /// several hosts (some are standbys) or when the URL asked for it.
    pub fn needs_writable(&self) -> bool {
        self.read_write || self.urls.len() > 1
    }
}

impl fmt::Debug for HostList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostList")
            .field("hosts", &self.names)
            .field("read_write", &self.read_write)
            .finish_non_exhaustive()
    }
}

/// Split `url`'s host list. A URL with one host (or none, for a socket
/// named by `?host=/path`) comes back as itself, less any
/// `target_session_attrs`.
pub fn parse(url: &str) -> Result<HostList, HostListError> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or(HostListError::Scheme)?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    // A password cut short by an unencoded '/', '?' or '#' leaves its '@'
    // after the authority, and a part of it where the host should be:
    // refused (it would be shown as a host name). A database name with an
    // '@' is refused too.
    let path_end = tail.find(['?', '#']).unwrap_or(tail.len());
    if tail[..path_end].contains('@') || (!authority.contains('@') && tail.contains('@')) {
        return Err(HostListError::UnencodedUserinfo);
    }
    // The user information ends at the last '@' (a '@' in a password must
    // be percent-encoded, but one that is not still ends up here).
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    let (path, query, fragment) = split_tail(tail);
    let (query, read_write) = take_target_session_attrs(query)?;

    let mut urls = Vec::new();
    let mut names = Vec::new();
    if !hosts.contains(',') {
        // One host: whatever sqlx makes of it (a socket, PGHOST, ...).
        urls.push(assemble(userinfo, hosts, path, &query, fragment));
        names.push(if hosts.is_empty() {
            "(default host)".to_owned()
        } else {
            hosts.to_owned()
        });
    } else {
        if query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .any(|(key, value)| matches!(key, "host" | "hostaddr" | "port") && value.contains(','))
        {
            return Err(HostListError::ListInParameter);
        }
        for (i, host) in hosts.split(',').enumerate() {
            let position = i + 1;
            check_host(host, position)?;
            urls.push(assemble(userinfo, host, path, &query, fragment));
            names.push(host.to_owned());
        }
    }
    Ok(HostList {
        urls,
        names,
        read_write,
    })
}

/// `(path, query without '?', fragment with '#')` of what follows the
/// authority.
fn split_tail(tail: &str) -> (&str, &str, &str) {
    let (before_fragment, fragment) = match tail.find('#') {
        Some(hash) => tail.split_at(hash),
        None => (tail, ""),
    };
    match before_fragment.split_once('?') {
        Some((path, query)) => (path, query, fragment),
        None => (before_fragment, "", fragment),
    }
}

/// The query without `target_session_attrs`, and whether it asked for a
/// host that accepts writes.
fn take_target_session_attrs(query: &str) -> Result<(String, bool), HostListError> {
    let mut kept = Vec::new();
    let mut read_write = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == TARGET_SESSION_ATTRS {
            match value {
                "read-write" | "primary" => read_write = true,
                _ => return Err(HostListError::TargetSessionAttrs),
            }
        } else {
            kept.push(pair);
        }
    }
    Ok((kept.join("&"), read_write))
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`; the port, if written, is
/// 1..=65535.
fn check_host(host: &str, position: usize) -> Result<(), HostListError> {
    if host.is_empty() {
        return Err(HostListError::EmptyHost(position));
    }
    let (name, port) = if let Some(bracketed) = host.strip_prefix('[') {
        let (address, after) = bracketed
            .split_once(']')
            .ok_or(HostListError::BadHost(position))?;
        if address.is_empty()
            || !address
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return Err(HostListError::BadHost(position));
        }
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or(HostListError::BadHost(position))?,
            ),
        };
        (None, port)
    } else {
        match host.split_once(':') {
            // An IPv6 address without brackets.
            Some((_, port)) if port.contains(':') => return Err(HostListError::BadHost(position)),
            Some((name, port)) => (Some(name), Some(port)),
            None => (Some(host), None),
        }
    };
    if let Some(name) = name {
        // Host names and IPv4 addresses; percent-encoding is not needed in
        // a host name and is refused with the rest.
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        {
            return Err(if name.is_empty() {
                HostListError::EmptyHost(position)
            } else {
                HostListError::BadHost(position)
            });
        }
    }
    if let Some(port) = port {
        let valid = !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u16>().is_ok_and(|p| p != 0);
        if !valid {
            return Err(HostListError::BadPort(position));
        }
    }
    Ok(())
}

fn assemble(userinfo: &str, host: &str, path: &str, query: &str, fragment: &str) -> String {
    let mut url = format!("postgres://{userinfo}{host}{path}");
    if !query.is_empty() {
        url.push('?');
        url.push_str(query);
    }
    url.push_str(fragment);
    url
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::str::FromStr as _;

    use sqlx::postgres::PgConnectOptions;

    use super::*;

    const SECRET: &str = "s3cr3t-Pa55";

    #[test]
    fn an_unencoded_separator_in_the_password_is_refused_without_showing_it() {
        for url in [
            "postgres://u:x7q/zz@db1,db2/cv",
            "postgres://u:x7q?zz@db1/cv",
            "postgres://u:x7q#zz@db1/cv",
            "postgres://u:9876/54@db1/cv",
        ] {
            let e = parse(url).unwrap_err();
            assert_eq!(e, HostListError::UnencodedUserinfo, "{url}");
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("x7q") && !shown.contains("9876"), "{shown}");
        }
        // Encoded, it is fine.
        assert!(parse("postgres://u:x7q%2Fzz@db1,db2/cv").is_ok());
    }

    #[test]
    fn one_url_per_host_with_everything_else_shared() {
        let list = parse(&format!(
            "postgres://vault:{SECRET}@db1:5432,db2,10.0.0.3:5433,[fd00::1]:6432,[::1]/cardvault\
             ?sslmode=require&target_session_attrs=read-write&application_name=x"
        ))
        .unwrap();
        assert_eq!(
            list.urls(),
            [
                format!("postgres://vault:{SECRET}@db1:5432/cardvault?sslmode=require&application_name=x"),
                format!("postgres://vault:{SECRET}@db2/cardvault?sslmode=require&application_name=x"),
                format!("postgres://vault:{SECRET}@10.0.0.3:5433/cardvault?sslmode=require&application_name=x"),
                format!("postgres://vault:{SECRET}@[fd00::1]:6432/cardvault?sslmode=require&application_name=x"),
                format!("postgres://vault:{SECRET}@[::1]/cardvault?sslmode=require&application_name=x"),
            ]
        );
        assert_eq!(
            list.names(),
            [
                "db1:5432",
                "db2",
                "10.0.0.3:5433",
                "[fd00::1]:6432",
                "[::1]"
            ]
        );
        assert!(list.needs_writable());
        // sqlx reads each: hosts and ports (5432 when none is written),
        // and the shared user, password and database.
        let opts: Vec<PgConnectOptions> = list
            .urls()
            .iter()
            .map(|u| PgConnectOptions::from_str(u).unwrap())
            .collect();
        let hosts: Vec<(String, u16)> = opts
            .iter()
            .map(|o| (o.get_host().to_owned(), o.get_port()))
            .collect();
        assert_eq!(
            hosts,
            [
                ("db1".to_owned(), 5432),
                ("db2".to_owned(), 5432),
                ("10.0.0.3".to_owned(), 5433),
                ("[fd00::1]".to_owned(), 6432),
                ("[::1]".to_owned(), 5432),
            ]
        );
        for o in &opts {
            assert_eq!(o.get_username(), "vault");
            assert_eq!(o.get_database(), Some("cardvault"));
        }
    }

    #[test]
    fn a_single_host_stays_as_written() {
        for url in [
            "postgres://postgres@127.0.0.1:5432/postgres",
            "postgresql://u:p%40ss@db/cv?sslmode=verify-full&sslrootcert=/etc/ca.pem",
            "postgres:///cardvault?host=/var/run/postgresql",
            "postgres://db",
        ] {
            let list = parse(url).unwrap();
            let expected = url.replacen("postgresql://", "postgres://", 1);
            assert_eq!(list.urls(), [expected], "{url}");
            assert!(!list.needs_writable(), "{url}");
        }
        // Asked for explicitly, one host is checked too; the parameter is
        // not passed on (sqlx does not know it).
        let list = parse("postgres://u@db:5433/cv?target_session_attrs=primary").unwrap();
        assert_eq!(list.urls(), ["postgres://u@db:5433/cv"]);
        assert!(list.needs_writable());
        let list =
            parse("postgres://u@db/cv?sslmode=require&target_session_attrs=read-write#x").unwrap();
        assert_eq!(list.urls(), ["postgres://u@db/cv?sslmode=require#x"]);
    }

    #[test]
    fn bad_input_is_a_typed_error_without_the_password() {
        let cases = [
            ("mysql://u:{S}@a,b/db", HostListError::Scheme),
            ("postgres://u:{S}@a,,b/db", HostListError::EmptyHost(2)),
            ("postgres://u:{S}@a,b,/db", HostListError::EmptyHost(3)),
            ("postgres://u:{S}@,a/db", HostListError::EmptyHost(1)),
            ("postgres://u:{S}@a,:5432/db", HostListError::EmptyHost(2)),
            ("postgres://u:{S}@a:0,b/db", HostListError::BadPort(1)),
            ("postgres://u:{S}@a,b:65536/db", HostListError::BadPort(2)),
            ("postgres://u:{S}@a,b:/db", HostListError::BadPort(2)),
            ("postgres://u:{S}@a,b:54x2/db", HostListError::BadPort(2)),
            ("postgres://u:{S}@a,b:+5432/db", HostListError::BadPort(2)),
            ("postgres://u:{S}@a,fd00::1/db", HostListError::BadHost(2)),
            ("postgres://u:{S}@a,[fd00::1/db", HostListError::BadHost(2)),
            (
                "postgres://u:{S}@a,[fd00::1]5432/db",
                HostListError::BadHost(2),
            ),
            ("postgres://u:{S}@a,[]:5432/db", HostListError::BadHost(2)),
            ("postgres://u:{S}@a b,c/db", HostListError::BadHost(1)),
            ("postgres://u:{S}@a,b%2Fc/db", HostListError::BadHost(2)),
            (
                "postgres://u:{S}@a,b/db?port=5432,5433",
                HostListError::ListInParameter,
            ),
            (
                "postgres://u:{S}@a,b/db?target_session_attrs=any",
                HostListError::TargetSessionAttrs,
            ),
            (
                "postgres://u:{S}@a/db?target_session_attrs=standby",
                HostListError::TargetSessionAttrs,
            ),
        ];
        for (template, expected) in cases {
            let url = template.replace("{S}", SECRET);
            let err = parse(&url).unwrap_err();
            assert_eq!(err, expected, "{template}");
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains(SECRET), "{shown}");
            assert!(!shown.contains("u:"), "{shown}");
        }
        // Nor does a parsed list show it.
        let list = parse(&format!("postgres://u:{SECRET}@a,b/db")).unwrap();
        let shown = format!("{list:?}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(shown.contains("\"a\", \"b\""), "{shown}");
    }
}
