//! The actix-web app of one listener: its routes (`routes::configure_for`),
//! and the middleware every request passes: a request id (`x-request-id`,
//! also in the audit trail, and a `request` span around the request so that
//! every log line of it carries the id), the request-head size limit (431),
//! the access log line (route pattern, never the raw path) and the request
//! metrics.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{Service as _, ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{web, App, HttpMessage};
use base64::Engine as _;
use tracing::Instrument as _;

use crate::listeners::{Connection, ListenerKind};
use crate::routes;
use crate::state::{AppState, RequestId};

/// The actix-web app of one listener: the routes it serves, request ids,
/// the header-size limit, the request log and metrics.
pub fn app(
    state: web::Data<AppState>,
    kind: ListenerKind,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let limit = state.max_header_bytes;
    let metrics_state = state.clone();
    App::new()
        .app_data(state)
        .wrap_fn(move |req, srv| {
            let id = new_request_id();
            req.extensions_mut().insert(RequestId(id.clone()));
            let method = req.method().clone();
            let started = Instant::now();
            let listener = req
                .conn_data::<Connection>()
                .map_or("unknown", |c| c.listener.name());
            let header_bytes: usize = req
                .headers()
                .iter()
                .map(|(name, value)| name.as_str().len() + value.len() + 4)
                .sum();
            // Too large: answered here, and logged and counted below like
            // any other answer.
            let call = if header_bytes <= limit {
                Ok(srv.call(req))
            } else {
                Err(req)
            };
            let state = metrics_state.clone();
            // Every line logged while the request is served carries its
            // request id and listener (the span's fields, in JSON logs).
            let span = tracing::info_span!("request", request_id = %id, listener);
            async move {
                let mut res = match call {
                    Ok(fut) => fut.await?.map_into_boxed_body(),
                    Err(req) => req.into_response(actix_web::ResponseError::error_response(
                        &crate::error::ApiError::HeadersTooLarge(limit),
                    )),
                };
                if let Ok(v) = HeaderValue::from_str(&id) {
                    res.headers_mut()
                        .insert(HeaderName::from_static("x-request-id"), v);
                }
                // The route pattern, never the raw path: a client may put
                // anything in a URL, including a card number.
                let route = res
                    .request()
                    .match_pattern()
                    .unwrap_or_else(|| crate::metrics::UNMATCHED_ROUTE.to_owned());
                let status = res.status().as_u16();
                let elapsed = started.elapsed();
                state
                    .metrics
                    .observe_request(listener, method.as_str(), &route, status, elapsed);
                tracing::info!(
                    request_id = %id,
                    listener,
                    method = %method,
                    route = %route,
                    status,
                    micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                    "request"
                );
                Ok(res)
            }
            .instrument(span)
        })
        .configure(|cfg| routes::configure_for(cfg, kind))
        .default_service(web::to(routes::not_found))
}

/// A fresh request id (96 random bits, URL-safe); the edge's too.
pub(crate) fn new_request_id() -> String {
    let mut raw = [0u8; 12];
    if getrandom::getrandom(&mut raw).is_err() {
        return "unavailable".to_owned();
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}
