//! The HTTP side of `serve`: a JSON body describing who answered and what arrived, shaped by
//! httpbin-style controls. Each control has a per-pod default (environment, see
//! [`Controls`]) that a request may override:
//!
//! | control | per request | per pod |
//! |---|---|---|
//! | answer a status | path `/status/<code>`, header `x-echo-status` | `ECHO_STATUS` |
//! | wait before answering | path `/delay/<ms>`, query `delay=<ms>`, header `x-echo-delay-ms` | `ECHO_DELAY_MS` |
//! | fail a fraction of requests | header `x-echo-fail-fraction` | `ECHO_FAIL_FRACTION` |
//! | the status of those failures | header `x-echo-fail-status` | `ECHO_FAIL_STATUS` |

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode, Uri, Version};
use http_body_util::Full;
use serde_json::json;

use crate::Identity;

/// The longest delay a request may ask for (keeps a typo from parking a connection for days).
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(600);

/// Header: answer this status.
pub(crate) const STATUS_HEADER: &str = "x-echo-status";
/// Header: wait this many milliseconds before answering.
pub(crate) const DELAY_HEADER: &str = "x-echo-delay-ms";
/// Header: fail this fraction (0.0-1.0) of requests.
pub(crate) const FAIL_FRACTION_HEADER: &str = "x-echo-fail-fraction";
/// Header: the status failed requests get.
pub(crate) const FAIL_STATUS_HEADER: &str = "x-echo-fail-status";

/// A control value that cannot be used; names where it came from.
#[derive(Debug, thiserror::Error, PartialEq)]
pub(crate) enum ControlError {
    /// A status outside 200-599 or not a number.
    #[error("{origin}: {value:?} is not an HTTP status between 200 and 599")]
    Status {
        /// Where the value came from (path, header or variable).
        origin: String,
        /// The value.
        value: String,
    },
    /// A delay that is not a whole number of milliseconds up to the maximum.
    #[error("{origin}: {value:?} is not a delay in milliseconds between 0 and {max}", max = MAX_DELAY.as_millis())]
    Delay {
        /// Where the value came from.
        origin: String,
        /// The value.
        value: String,
    },
    /// A fraction outside 0.0-1.0.
    #[error("{origin}: {value:?} is not a fraction between 0.0 and 1.0")]
    Fraction {
        /// Where the value came from.
        origin: String,
        /// The value.
        value: String,
    },
}

/// Parses an HTTP status for an answer (200-599; 1xx cannot be a final answer).
pub(crate) fn parse_status(origin: &str, value: &str) -> Result<u16, ControlError> {
    value
        .trim()
        .parse::<u16>()
        .ok()
        .filter(|s| (200..=599).contains(s))
        .ok_or_else(|| ControlError::Status {
            origin: origin.to_string(),
            value: value.to_string(),
        })
}

/// Parses a delay in milliseconds (at most [`MAX_DELAY`]).
pub(crate) fn parse_delay(origin: &str, value: &str) -> Result<Duration, ControlError> {
    value
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_millis)
        .filter(|d| *d <= MAX_DELAY)
        .ok_or_else(|| ControlError::Delay {
            origin: origin.to_string(),
            value: value.to_string(),
        })
}

/// Parses a fraction between 0.0 and 1.0.
pub(crate) fn parse_fraction(origin: &str, value: &str) -> Result<f64, ControlError> {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|f| (0.0..=1.0).contains(f))
        .ok_or_else(|| ControlError::Fraction {
            origin: origin.to_string(),
            value: value.to_string(),
        })
}

/// What every request gets unless it asks otherwise: the pod's settings from its environment.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Controls {
    /// The status answered (`ECHO_STATUS`, default 200).
    pub(crate) status: u16,
    /// The wait before answering (`ECHO_DELAY_MS`, default 0).
    pub(crate) delay: Duration,
    /// The fraction of requests failed (`ECHO_FAIL_FRACTION`, default 0).
    pub(crate) fail_fraction: f64,
    /// The status of failed requests (`ECHO_FAIL_STATUS`, default 503).
    pub(crate) fail_status: u16,
}

impl Default for Controls {
    fn default() -> Self {
        Controls {
            status: 200,
            delay: Duration::ZERO,
            fail_fraction: 0.0,
            fail_status: 503,
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .map(|v| std::str::from_utf8(v.as_bytes()).unwrap_or("\u{fffd}"))
}

impl Controls {
    /// These controls with one request's overrides applied (path, query, headers).
    pub(crate) fn for_request(&self, uri: &Uri, headers: &HeaderMap) -> Result<Self, ControlError> {
        let mut plan = self.clone();
        let path = uri.path();
        if let Some(code) = path.strip_prefix("/status/") {
            plan.status = parse_status("path /status/<code>", code.trim_end_matches('/'))?;
        }
        if let Some(ms) = path.strip_prefix("/delay/") {
            plan.delay = parse_delay("path /delay/<ms>", ms.trim_end_matches('/'))?;
        }
        for pair in uri.query().unwrap_or("").split('&') {
            if let Some(ms) = pair.strip_prefix("delay=") {
                plan.delay = parse_delay("query delay", ms)?;
            }
        }
        if let Some(v) = header(headers, STATUS_HEADER) {
            plan.status = parse_status(&format!("header {STATUS_HEADER}"), v)?;
        }
        if let Some(v) = header(headers, DELAY_HEADER) {
            plan.delay = parse_delay(&format!("header {DELAY_HEADER}"), v)?;
        }
        if let Some(v) = header(headers, FAIL_FRACTION_HEADER) {
            plan.fail_fraction = parse_fraction(&format!("header {FAIL_FRACTION_HEADER}"), v)?;
        }
        if let Some(v) = header(headers, FAIL_STATUS_HEADER) {
            plan.fail_status = parse_status(&format!("header {FAIL_STATUS_HEADER}"), v)?;
        }
        Ok(plan)
    }

    /// Whether a request fails, given a uniform random `roll` in [0, 1).
    pub(crate) fn fails(&self, roll: f64) -> bool {
        roll < self.fail_fraction
    }

    /// The status to answer, given a uniform random `roll` in [0, 1).
    pub(crate) fn status_for(&self, roll: f64) -> u16 {
        if self.fails(roll) {
            self.fail_status
        } else {
            self.status
        }
    }
}

/// `HTTP/1.1`, `HTTP/2`, ... as a user writes it.
pub(crate) fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "unknown",
    }
}

/// Answers one HTTP request: waits if asked, then the JSON body with the chosen status.
pub(crate) async fn answer<B>(
    id: &Identity,
    controls: &Controls,
    peer: SocketAddr,
    req: http::Request<B>,
) -> http::Response<Full<Bytes>> {
    let plan = match controls.for_request(req.uri(), req.headers()) {
        Ok(plan) => plan,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("ambit-echo: {e}\n")),
    };
    if !plan.delay.is_zero() {
        tokio::time::sleep(plan.delay).await;
    }
    let status = plan.status_for(rand::random::<f64>());
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).to_string(),
            )
        })
        .collect();
    let host = header(req.headers(), "host")
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let mut body = id.json(peer);
    body["method"] = json!(req.method().as_str());
    body["path"] = json!(
        req.uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    );
    body["host"] = json!(host);
    body["protocol"] = json!(protocol(req.version()));
    body["status"] = json!(status);
    body["headers"] = json!(headers);
    // Statuses validated to 200-599 above.
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let bytes = if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        Bytes::new()
    } else {
        Bytes::from(format!("{body}\n"))
    };
    let mut response = http::Response::new(Full::new(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn text(status: StatusCode, message: String) -> http::Response<Full<Bytes>> {
    let mut response = http::Response::new(Full::new(Bytes::from(message)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(uri: &str, headers: &[(&str, &str)]) -> Result<Controls, ControlError> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        Controls::default().for_request(&uri.parse().unwrap(), &map)
    }

    #[test]
    fn path_query_and_headers_override_the_pod_defaults() {
        assert_eq!(plan("/status/418", &[]).unwrap().status, 418);
        assert_eq!(plan("/status/404/", &[]).unwrap().status, 404);
        assert_eq!(
            plan("/delay/250", &[]).unwrap().delay,
            Duration::from_millis(250)
        );
        assert_eq!(
            plan("/x?a=1&delay=40", &[]).unwrap().delay,
            Duration::from_millis(40)
        );
        let p = plan(
            "/",
            &[
                (STATUS_HEADER, "201"),
                (DELAY_HEADER, "7"),
                (FAIL_FRACTION_HEADER, "0.5"),
                (FAIL_STATUS_HEADER, "500"),
            ],
        )
        .unwrap();
        assert_eq!(
            p,
            Controls {
                status: 201,
                delay: Duration::from_millis(7),
                fail_fraction: 0.5,
                fail_status: 500
            }
        );
        assert_eq!(plan("/anything", &[]).unwrap(), Controls::default());
    }

    #[test]
    fn bad_values_name_their_source() {
        assert_eq!(
            plan("/status/99", &[]).unwrap_err().to_string(),
            "path /status/<code>: \"99\" is not an HTTP status between 200 and 599"
        );
        assert_eq!(
            plan("/", &[(DELAY_HEADER, "soon")])
                .unwrap_err()
                .to_string(),
            "header x-echo-delay-ms: \"soon\" is not a delay in milliseconds between 0 and 600000"
        );
        assert_eq!(
            plan("/", &[(FAIL_FRACTION_HEADER, "1.5")])
                .unwrap_err()
                .to_string(),
            "header x-echo-fail-fraction: \"1.5\" is not a fraction between 0.0 and 1.0"
        );
        assert!(plan("/delay/600001", &[]).is_err());
    }

    #[test]
    fn the_fail_fraction_decides_by_the_roll() {
        let c = Controls {
            fail_fraction: 0.25,
            ..Controls::default()
        };
        assert_eq!(c.status_for(0.0), 503);
        assert_eq!(c.status_for(0.2499), 503);
        assert_eq!(c.status_for(0.25), 200);
        assert_eq!(c.status_for(0.99), 200);
        assert_eq!(Controls::default().status_for(0.0), 200);
        let always = Controls {
            fail_fraction: 1.0,
            fail_status: 500,
            ..Controls::default()
        };
        assert_eq!(always.status_for(0.999_999), 500);
    }
}
