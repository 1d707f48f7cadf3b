//! TEMPORARY: stand-ins until `Metrics` has these methods (removed then).
#![allow(dead_code)]
pub trait MetricsHooks {
    fn observe_request(&self, _l: &str, _m: &str, _r: &str, _s: u16, _e: std::time::Duration) {}
    fn auth_failure(&self, _l: &str, _r: &str) {}
    fn tls_handshake_failure(&self, _l: &str, _r: &str) {}
}
impl MetricsHooks for crate::metrics::Metrics {}
