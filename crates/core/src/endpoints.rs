//! The operator endpoints every Ambit proxy serves: Prometheus on :15020 (`/metrics`,
//! `/stats/prometheus`), readiness on :15021 (`/healthz/ready`), and the `/logging` control of
//! the admin port.

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::http::{Handler, text};
use crate::logging::LogHandle;
use crate::metrics::Registry;
use crate::readiness::Readiness;

/// The Prometheus handler; `before_scrape` refreshes gauges computed from current state.
pub fn metrics_handler(
    registry: Registry,
    before_scrape: Arc<dyn Fn(&Registry) + Send + Sync>,
) -> Handler {
    Handler::new(move |request| {
        let registry = registry.clone();
        let before_scrape = before_scrape.clone();
        async move {
            match request.uri().path() {
                "/metrics" | "/stats/prometheus" => {
                    before_scrape(&registry);
                    let mut response = text(StatusCode::OK, registry.render());
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    response
                }
                _ => text(StatusCode::NOT_FOUND, "metrics are at /metrics\n"),
            }
        }
    })
}

/// The readiness handler: `200 ready` or `500` naming what is pending.
pub fn readiness_handler(readiness: Readiness) -> Handler {
    Handler::new(move |request| {
        let readiness = readiness.clone();
        async move {
            if request.uri().path() != "/healthz/ready" {
                return text(StatusCode::NOT_FOUND, "readiness is at /healthz/ready\n");
            }
            let (status, body) = readiness.report();
            text(
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                body,
            )
        }
    })
}

/// `/logging`: shows the log filter; `?level=<filter>` changes it, `?reset` restores the one the
/// process started with.
pub fn logging(log: Option<&LogHandle>, query: Option<&str>) -> Response<Full<Bytes>> {
    let Some(log) = log else {
        return text(
            StatusCode::NOT_IMPLEMENTED,
            "logging is not managed by this process\n",
        );
    };
    let level = query.and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("level="))
            .map(|v| v.replace("%3D", "=").replace("%2C", ","))
    });
    let reset = query.is_some_and(|q| q.split('&').any(|kv| kv == "reset"));
    let result = match (level, reset) {
        (_, true) => log.reset(),
        (Some(level), false) => log.set_level(&level),
        (None, false) => Ok(()),
    };
    match result {
        Ok(()) => text(
            StatusCode::OK,
            format!("current log level: {}\n", log.current()),
        ),
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}
