//! The forwarding proxy's upstreams (issue 18), loaded: each checked
//! `[[upstream]]` table of the configuration file with its TLS client
//! configuration (its CA as the only roots, its client certificate). An
//! upstream whose files are missing, unreadable or whose key is not
//! private refuses the start, naming the upstream; on SIGHUP the tables are
//! read again and swapped as a whole, or, if any is refused, the previous
//! set stays in use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::config::upstreams::UpstreamSpec;
use crate::tls::TlsError;

/// An upstream ready to be called.
#[derive(Debug)]
pub struct Upstream {
    pub spec: UpstreamSpec,
    pub tls: Arc<rustls::ClientConfig>,
}

/// Why the upstreams cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {0}: {1}")]
    Tls(String, #[source] TlsError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// Every upstream, by name.
#[derive(Debug, Default)]
pub struct Upstreams {
    by_name: BTreeMap<String, Arc<Upstream>>,
}

impl Upstreams {
    /// Read every upstream's CA, client certificate and key.
    pub fn load(specs: &[UpstreamSpec]) -> Result<Upstreams, UpstreamError> {
        let mut by_name = BTreeMap::new();
        for spec in specs {
            let client = spec
                .client_cert
                .as_ref()
                .map(|(c, k)| (c.as_path(), k.as_path()));
            let tls = crate::tls::client_config(&spec.ca_file, client)
                .map_err(|e| UpstreamError::Tls(spec.name.clone(), e))?;
            by_name.insert(
                spec.name.clone(),
                Arc::new(Upstream {
                    spec: spec.clone(),
                    tls: Arc::new(tls),
                }),
            );
        }
        Ok(Upstreams { by_name })
    }

    pub fn get(&self, name: &str) -> Option<Arc<Upstream>> {
        self.by_name.get(name).cloned()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// What `GET /v1/admin/upstreams` shows: the configuration, no secret
    /// (file paths, not their contents).
    pub fn listing(&self) -> serde_json::Value {
        let list: Vec<serde_json::Value> = self
            .by_name
            .values()
            .map(|u| {
                let s = &u.spec;
                serde_json::json!({
                    "name": s.name,
                    "url": format!("{}{}", s.origin, s.base_path),
                    "ca_file": s.ca_file.display().to_string(),
                    "mutual_tls": s.client_cert.is_some(),
                    "client_cert_file": s.client_cert.as_ref().map(|(c, _)| c.display().to_string()),
                    "paths": s.paths.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
                    "tenants": s.tenants.clone().unwrap_or_else(|| vec!["*".to_owned()]),
                    "connect_timeout_ms": u64::try_from(s.connect_timeout.as_millis()).unwrap_or(u64::MAX),
                    "timeout_ms": u64::try_from(s.timeout.as_millis()).unwrap_or(u64::MAX),
                    "max_request_bytes": s.max_request_bytes,
                    "max_response_bytes": s.max_response_bytes,
                    "forward_headers": s.forward_headers,
                })
            })
            .collect();
        serde_json::json!({ "upstreams": list })
    }
}

/// The upstreams in use, swapped as a whole on reload.
#[derive(Debug)]
pub struct ReloadableUpstreams {
    config_file: Option<PathBuf>,
    current: RwLock<Arc<Upstreams>>,
}

impl ReloadableUpstreams {
    pub fn new(config_file: Option<&Path>, upstreams: Upstreams) -> ReloadableUpstreams {
        ReloadableUpstreams {
            config_file: config_file.map(Path::to_path_buf),
            current: RwLock::new(Arc::new(upstreams)),
        }
    }

    pub fn current(&self) -> Arc<Upstreams> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Read the configuration file's `[[upstream]]` tables and their files
    /// again; on any error the previous set stays. Returns the names now
    /// in use.
    pub fn reload(&self) -> Result<Vec<String>, UpstreamError> {
        let specs = match &self.config_file {
            Some(path) => crate::config::read_upstreams(path)?,
            None => Vec::new(),
        };
        let loaded = Upstreams::load(&specs)?;
        let names = loaded.names().map(str::to_owned).collect();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
        Ok(names)
    }
}
