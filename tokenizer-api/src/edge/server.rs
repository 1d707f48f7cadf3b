//! The `collect` listener: TLS (rustls, the vault's protocol versions and
//! AEAD suites, no client certificates; the material reloadable) or, on
//! loopback only, plain HTTP;
//! actix-http serving the edge's actix-web app, with a request id and an
//! access log line per request (route pattern, status, request id; never
//! the raw path or a body).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_http::{HttpService, Protocol};
use actix_service::{fn_service, map_config, IntoServiceFactory as _, ServiceFactoryExt as _};
use actix_web::dev::{AppConfig, Service as _};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{web, App};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::routes::{self, EdgeState};
use crate::server::Io;
use crate::tls::{ClientCerts, ReloadableTls};

/// Open connections at most; more are closed at once.
const MAX_CONNECTIONS: usize = 4096;

fn refused(why: &'static str) -> actix_http::error::DispatchError {
    actix_http::error::DispatchError::Io(std::io::Error::other(why))
}

async fn accept(
    tcp: TcpStream,
    tls: Option<Arc<ReloadableTls>>,
    slots: Arc<Semaphore>,
    handshake_timeout: Duration,
) -> Result<(Io, Protocol, Option<SocketAddr>), actix_http::error::DispatchError> {
    let peer = tcp.peer_addr().ok();
    // The slot is held by the handshake only; actix-http limits what follows.
    let Ok(_slot) = slots.try_acquire_owned() else {
        return Err(refused("connection limit"));
    };
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok((Io::Plain(tcp), Protocol::Http1, peer));
    };
    // The material current when this handshake starts (SIGHUP reloads it).
    let config = tls
        .config(ClientCerts::None)
        .map_err(|_| refused("tls configuration"))?;
    let handshake = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
    match tokio::time::timeout(handshake_timeout, handshake).await {
        Ok(Ok(stream)) => Ok((Io::Tls(Box::new(stream)), Protocol::Http1, peer)),
        Ok(Err(e)) => {
            tracing::debug!(
                reason = crate::tls::failure_reason(&e),
                "TLS handshake failed"
            );
            Err(refused("tls handshake"))
        }
        Err(_) => Err(refused("tls handshake timeout")),
    }
}

/// Build the server on a bound listener (not yet running).
pub fn build(
    listener: std::net::TcpListener,
    tls: Option<Arc<ReloadableTls>>,
    state: web::Data<EdgeState>,
) -> std::io::Result<(actix_server::Server, SocketAddr)> {
    let bound = listener.local_addr()?;
    let timeout = state.request_timeout;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let server = actix_server::Server::build()
        .shutdown_timeout(10)
        .backlog(1024)
        .listen("collect", listener, move || {
            let tls = tls.clone();
            let slots = slots.clone();
            let app = app(state.clone())
                .into_factory()
                .map_err(|err| err.error_response());
            fn_service(move |tcp: TcpStream| accept(tcp, tls.clone(), slots.clone(), timeout))
                .and_then(
                    HttpService::build()
                        .keep_alive(actix_http::KeepAlive::Timeout(Duration::from_secs(30)))
                        .client_request_timeout(timeout)
                        .client_disconnect_timeout(Duration::from_secs(1))
                        .finish(map_config(app, |()| AppConfig::default())),
                )
        })?
        .run();
    Ok((server, bound))
}

fn app(
    state: web::Data<EdgeState>,
) -> App<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    App::new()
        .app_data(state)
        .wrap_fn(|req, srv| {
            let id = crate::http::new_request_id();
            let method = req.method().clone();
            let started = Instant::now();
            let span = tracing::info_span!("request", request_id = %id, listener = "collect");
            let fut = srv.call(req);
            tracing::Instrument::instrument(
                async move {
                    let mut res = fut.await?;
                    if let Ok(v) = HeaderValue::from_str(&id) {
                        res.headers_mut()
                            .insert(HeaderName::from_static("x-request-id"), v);
                    }
                    // The route pattern, never the raw path.
                    let route = res
                        .request()
                        .match_pattern()
                        .unwrap_or_else(|| crate::metrics::UNMATCHED_ROUTE.to_owned());
                    tracing::info!(
                        request_id = %id,
                        listener = "collect",
                        method = %method,
                        route = %route,
                        status = res.status().as_u16(),
                        micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                        "request"
                    );
                    Ok(res)
                },
                span,
            )
        })
        .configure(routes::configure)
        .default_service(web::to(routes::not_found))
}
