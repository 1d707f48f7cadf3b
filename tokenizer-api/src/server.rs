//! Serving the listeners: our TLS handshake, per-listener connection
//! limits, and the HTTP service (actix-http with the listener's actix-web
//! app, `http::app`) behind it.
//!
//! The TLS handshake is ours (tokio-rustls) rather than the HTTP server's,
//! so that a refused client certificate is known with its source address:
//! it is audited and counted against the source like a failed login
//! (`limits`; a blocked source's refusals are counted, not audited again,
//! and its requests get 429). The verified connection is then served by
//! actix-http with the actix-web app.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_http::{HttpService, Protocol};
use actix_service::{fn_service, map_config, IntoServiceFactory as _, ServiceFactoryExt as _};
use actix_web::dev::{AppConfig, Extensions};
use actix_web::web;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::listeners::{Connection, ListenerKind, ListenerSpec};
use crate::state::AppState;
use crate::tls::ReloadableTls;

/// Limits of every listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Whole request head within it (408), body as the handler reads it.
    pub request_timeout: Duration,
    /// Idle keep-alive connections are closed after it.
    pub idle_timeout: Duration,
    /// The TLS handshake must finish within it.
    pub handshake_timeout: Duration,
    /// Open connections per listener; more are closed at once.
    pub max_connections: usize,
}

/// A served connection's stream: plain TCP (`--dev --insecure-plain-http`,
/// the edge's loopback trials) or TLS after our handshake. The edge's
/// listener serves it too.
pub(crate) enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An accepted (and, with TLS, verified) connection. Holds its listener's
/// connection slot until it closes.
pub struct Accepted {
    io: Io,
    connection: Connection,
    _slot: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Accepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accepted")
            .field("connection", &self.connection)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for Accepted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Everything a listener needs to accept a connection.
struct Acceptor {
    spec: ListenerSpec,
    tls: Option<Arc<ReloadableTls>>,
    slots: Arc<Semaphore>,
    state: web::Data<AppState>,
    limits: Limits,
}

fn refused(why: &'static str) -> actix_http::error::DispatchError {
    actix_http::error::DispatchError::Io(io::Error::other(why))
}

impl Acceptor {
    async fn accept(
        self: Arc<Self>,
        tcp: TcpStream,
    ) -> Result<(Accepted, Protocol, Option<SocketAddr>), actix_http::error::DispatchError> {
        let peer = tcp.peer_addr().ok();
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            tracing::warn!(
                listener = self.spec.kind.name(),
                max_connections = self.limits.max_connections,
                "connection limit reached: connection closed"
            );
            return Err(refused("connection limit"));
        };
        let _ = tcp.set_nodelay(true);
        let connection = |client| Connection {
            listener: self.spec.kind,
            auth: self.spec.auth,
            client,
        };
        let Some(tls) = &self.tls else {
            return Ok((
                Accepted {
                    io: Io::Plain(tcp),
                    connection: connection(None),
                    _slot: slot,
                },
                Protocol::Http1,
                peer,
            ));
        };
        let config = tls.config(self.spec.auth.client_certs()).map_err(|e| {
            tracing::error!(error = %e, "no TLS configuration for this listener");
            refused("tls configuration")
        })?;
        let handshake = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
        let reason = match tokio::time::timeout(self.limits.handshake_timeout, handshake).await {
            Ok(Ok(stream)) => {
                let client = crate::tls::client_identity(stream.get_ref().1).map(Arc::new);
                return Ok((
                    Accepted {
                        io: Io::Tls(Box::new(stream)),
                        connection: connection(client),
                        _slot: slot,
                    },
                    Protocol::Http1,
                    peer,
                ));
            }
            Ok(Err(e)) => crate::tls::failure_reason(&e),
            Err(_) => "timeout",
        };
        self.handshake_failed(peer, reason).await;
        Err(refused("tls handshake"))
    }

    /// A failed handshake: counted; one about the client's certificate is
    /// also audited and counts against its source like a failed login.
    async fn handshake_failed(&self, peer: Option<SocketAddr>, reason: &'static str) {
        let listener = self.spec.kind.name();
        self.state.metrics.tls_handshake_failure(listener, reason);
        if !crate::tls::is_certificate_failure(reason) {
            tracing::debug!(listener, reason, "TLS handshake failed");
            return;
        }
        // A source already blocked for failed authentications is not
        // audited again on every attempt (its block was).
        let ip = peer.map(|p| p.ip());
        if crate::auth::guard_source(&self.state, ip, None).is_err() {
            return;
        }
        tracing::warn!(listener, reason, source = ?peer, "client certificate refused at the TLS handshake");
        let source = peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
        let detail = format!("client_certificate_refused: {reason} (listener {listener})");
        if let Err(e) =
            crate::auth::record_auth_failure(&self.state, ip, &source, None, detail).await
        {
            tracing::error!(error = %e, "cannot record a refused client certificate in the audit trail");
        }
    }
}

/// A bound listener: its kind and address.
pub type Bound = (ListenerKind, SocketAddr);

/// Bind every listener and build the server (not yet running). Returns the
/// bound addresses in the order of `specs`.
pub fn build_server(
    specs: &[ListenerSpec],
    tls: Option<Arc<ReloadableTls>>,
    state: web::Data<AppState>,
    limits: Limits,
) -> Result<(actix_server::Server, Vec<Bound>), (SocketAddr, io::Error)> {
    let mut builder = actix_server::Server::build()
        .shutdown_timeout(10)
        .backlog(1024);
    let mut bound = Vec::new();
    for spec in specs {
        let listener = std::net::TcpListener::bind(spec.addr).map_err(|e| (spec.addr, e))?;
        let addr = listener.local_addr().map_err(|e| (spec.addr, e))?;
        bound.push((spec.kind, addr));
        let acceptor = Arc::new(Acceptor {
            spec: spec.clone(),
            tls: tls.clone(),
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            state: state.clone(),
            limits,
        });
        let state = state.clone();
        let kind = spec.kind;
        builder = builder
            .listen(spec.kind.name(), listener, move || {
                let acceptor = acceptor.clone();
                let app = crate::http::app(state.clone(), kind)
                    .into_factory()
                    .map_err(|err| err.error_response());
                fn_service(move |tcp: TcpStream| acceptor.clone().accept(tcp)).and_then(
                    HttpService::build()
                        .keep_alive(actix_http::KeepAlive::Timeout(limits.idle_timeout))
                        .client_request_timeout(limits.request_timeout)
                        .client_disconnect_timeout(Duration::from_secs(1))
                        .on_connect_ext(|io: &Accepted, ext: &mut Extensions| {
                            ext.insert(io.connection.clone());
                        })
                        .finish(map_config(app, |()| AppConfig::default())),
                )
            })
            .map_err(|e| (spec.addr, e))?;
    }
    Ok((builder.run(), bound))
}
