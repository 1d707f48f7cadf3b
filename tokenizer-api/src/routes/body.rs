//! Reading a request body: JSON only, size-limited, within the request
//! deadline, into a zeroizing buffer, refused unless object-shaped, parsed
//! with serde whose messages (which can quote a value) are never shown.
//!
//! Bodies are read by hand (not by actix's `Json` extractor) so that the
//! order of checks is ours: credentials first (the handler's), then media
//! type, size and JSON; and so that the raw bytes, which may hold a PAN,
//! live in a zeroizing buffer and never reach an error message.

use actix_web::http::header;
use actix_web::{web, HttpRequest};
use futures_util::StreamExt as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use zeroize::Zeroizing;

use crate::error::ApiError;
use crate::state::AppState;

/// Whether a body has the shape every request body has: a JSON object whose
/// arrays (only the batch's `cards`) sit directly in it and hold objects.
/// serde's derived deserializers would also take a struct written as an
/// array of its fields in declaration order (`["shop-42", "<pan>", 12,
/// 2031]`); that is not our API, so it is refused before parsing. A scan of
/// the raw bytes (strings skipped), without copying anything out of them;
/// malformed JSON is left to the parser to report.
pub(crate) fn object_shaped(body: &[u8]) -> bool {
    // Containers open at this point: `true` for an array.
    let mut stack: Vec<bool> = Vec::new();
    let mut in_string = false;
    let mut escaped = false;
    // A value may start here inside an array (after `[` or `,`).
    let mut expect_array_value = false;
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if b.is_ascii_whitespace() {
            continue;
        }
        if stack.is_empty() && b != b'{' {
            return false;
        }
        if expect_array_value && b != b']' && b != b'{' {
            return false;
        }
        expect_array_value = false;
        match b {
            b'"' => in_string = true,
            b'{' => stack.push(false),
            b'[' => {
                // Only directly inside the top-level object.
                if stack.len() != 1 {
                    return false;
                }
                stack.push(true);
                expect_array_value = true;
            }
            b'}' | b']' => {
                stack.pop();
            }
            b',' if stack.last() == Some(&true) => expect_array_value = true,
            _ => {}
        }
    }
    true
}

/// Read and parse a JSON body: 415 unless JSON, 413 over `limit`, 400 when
/// not JSON or not of the schema. The raw bytes are zeroized afterwards.
pub(crate) async fn read_json<T: DeserializeOwned>(
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
) -> Result<T, ApiError> {
    let deadline = req
        .app_data::<web::Data<AppState>>()
        .map_or(std::time::Duration::from_secs(10), |s| s.request_timeout);
    tokio::time::timeout(deadline, read_json_body(req, payload, limit))
        .await
        .map_err(|_| ApiError::RequestTimeout)?
}

/// Read a body of any type: 413 over `limit`, within the request
/// deadline, into a zeroizing buffer allocated once where the length is
/// declared (growing never leaves an unzeroized copy behind).
pub(crate) async fn read_bytes(
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    let deadline = req
        .app_data::<web::Data<AppState>>()
        .map_or(std::time::Duration::from_secs(10), |s| s.request_timeout);
    tokio::time::timeout(deadline, read_bytes_body(req, payload, limit))
        .await
        .map_err(|_| ApiError::RequestTimeout)?
}

async fn read_bytes_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let mut body = Zeroizing::new(Vec::with_capacity(declared.unwrap_or(4096).min(limit)));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| ApiError::BodyRead)?;
        if !crate::limits::append_within(&mut body, &chunk, limit) {
            return Err(ApiError::PayloadTooLarge(limit));
        }
    }
    Ok(body)
}

async fn read_json_body<T: DeserializeOwned>(
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
) -> Result<T, ApiError> {
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    let body = read_bytes_body(req, payload, limit).await?;
    // Syntax first (nothing is copied out of the body), then the shape,
    // then the schema: so not-JSON stays `malformed_json`.
    let syntax = |e: serde_json::Error| match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            ApiError::MalformedJson
        }
        _ => ApiError::InvalidRequest,
    };
    serde_json::from_slice::<serde::de::IgnoredAny>(&body).map_err(syntax)?;
    if !object_shaped(&body) {
        return Err(ApiError::InvalidRequest);
    }
    serde_json::from_slice(&body).map_err(|e| match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            ApiError::MalformedJson
        }
        // The serde message may quote the offending value or key: never used.
        serde_json::error::Category::Data | serde_json::error::Category::Io => {
            ApiError::InvalidRequest
        }
    })
}

/// A string from the request that may hold card data: zeroized on drop,
/// never printed.
pub(crate) struct SecretString(pub(crate) Zeroizing<String>);

impl<'de> Deserialize<'de> for SecretString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = SecretString;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SecretString, E> {
                Ok(SecretString(Zeroizing::new(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<SecretString, E> {
                Ok(SecretString(Zeroizing::new(v)))
            }
        }
        d.deserialize_string(V)
    }
}

#[cfg(test)]
mod tests {
    use super::object_shaped;

    #[test]
    fn bodies_must_be_objects_with_arrays_of_objects() {
        for ok in [
            &br#"{"tenant":"t","pan":"x","exp_month":1,"exp_year":2}"#[..],
            br#" { "cards" : [ {"pan":"["}, { "pan" : "\"]" } ] , "tenant":"t"} "#,
            br#"{"cards":[]}"#,
            br#"{"reason":"a [b] {c}"}"#,
            // Malformed JSON is the parser's to report.
            br#"{"a":"#,
        ] {
            assert!(object_shaped(ok), "{}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &br#"["t","x",1,2]"#[..],
            br#"  [{"tenant":"t"}]"#,
            br#""string""#,
            br#"12"#,
            br#"{"cards":[["x",1,2,null]]}"#,
            br#"{"cards":[{"pan":"x"},["x"]]}"#,
            br#"{"cards":[1]}"#,
            br#"{"a":{"b":[{}]}}"#,
        ] {
            assert!(!object_shaped(bad), "{}", String::from_utf8_lossy(bad));
        }
    }
}
