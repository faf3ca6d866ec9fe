//! Retries: which outcomes are retried (Envoy's `retryOn` names and status codes, as Istio and
//! the Gateway API write them), the backoff between tries, and request bodies that can be sent
//! again.
//!
//! A body is replayed only if it is known to fit in [`REPLAY_LIMIT`] (no body, or a declared
//! length within it): when a rule retries, such a body is read before the first try. A larger
//! body, or one of unknown length (a gRPC stream), is streamed to the first try and never
//! retried (the request then gets one try, whatever `attempts` says).

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use ambit_proto::waypoint as pb;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use rand::Rng;

use crate::upstream::{BoxError, RequestBody};

/// The largest request body kept for replay on a retry.
pub const REPLAY_LIMIT: usize = 64 * 1024;
/// Backoff when the rule names none (Envoy's default base interval).
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

/// When to retry.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    /// Each try's limit.
    pub per_try_timeout: Option<Duration>,
    /// Base backoff (jittered, doubling, at most 10x).
    pub backoff: Duration,
    codes: HashSet<u16>,
    on_5xx: bool,
    on_gateway_error: bool,
    on_reset: bool,
    on_connect_failure: bool,
    on_retriable_4xx: bool,
    grpc: HashSet<u32>,
}

impl RetryPolicy {
    /// The policy of a rule's `retry`.
    pub fn from_proto(retry: &pb::Retry) -> Self {
        let mut policy = RetryPolicy {
            attempts: retry.attempts,
            per_try_timeout: retry
                .per_try_timeout
                .as_ref()
                .and_then(|d| Duration::try_from(*d).ok())
                .filter(|d| !d.is_zero()),
            backoff: retry
                .backoff
                .as_ref()
                .and_then(|d| Duration::try_from(*d).ok())
                .filter(|d| !d.is_zero())
                .unwrap_or(DEFAULT_BACKOFF),
            codes: retry
                .codes
                .iter()
                .filter_map(|c| u16::try_from(*c).ok())
                .collect(),
            on_5xx: false,
            on_gateway_error: false,
            on_reset: false,
            on_connect_failure: false,
            on_retriable_4xx: false,
            grpc: HashSet::new(),
        };
        let names: Vec<&str> = if retry.retry_on.is_empty() {
            // Istio's default retryOn; HTTPRoute codes (or 503) are its retriable-status-codes.
            vec![
                "connect-failure",
                "refused-stream",
                "unavailable",
                "cancelled",
                "retriable-status-codes",
            ]
        } else {
            retry.retry_on.iter().map(String::as_str).collect()
        };
        if retry.retry_on.is_empty() && policy.codes.is_empty() {
            policy.codes.insert(503);
        }
        for name in names {
            match name.trim() {
                "5xx" => policy.on_5xx = true,
                "gateway-error" => policy.on_gateway_error = true,
                "reset" | "refused-stream" => policy.on_reset = true,
                "connect-failure" => policy.on_connect_failure = true,
                "retriable-4xx" => policy.on_retriable_4xx = true,
                "cancelled" => {
                    policy.grpc.insert(1);
                }
                "deadline-exceeded" => {
                    policy.grpc.insert(4);
                }
                "resource-exhausted" => {
                    policy.grpc.insert(8);
                }
                "internal" => {
                    policy.grpc.insert(13);
                }
                "unavailable" => {
                    policy.grpc.insert(14);
                }
                other => {
                    if let Ok(code) = other.parse::<u16>() {
                        policy.codes.insert(code);
                    }
                }
            }
        }
        policy
    }

    /// Whether a response with `status` (and `grpc_status` of a trailers-only answer) is
    /// retried.
    pub fn retries_status(&self, status: u16, grpc_status: Option<u32>) -> bool {
        self.codes.contains(&status)
            || (self.on_5xx && status >= 500)
            || (self.on_gateway_error && matches!(status, 502..=504))
            || (self.on_retriable_4xx && status == 409)
            || grpc_status.is_some_and(|g| self.grpc.contains(&g))
    }

    /// Whether a failure to connect is retried (also by `5xx` and `gateway-error`, as in Envoy).
    pub fn retries_connect_failure(&self) -> bool {
        self.on_connect_failure || self.on_5xx || self.on_gateway_error
    }

    /// Whether a reset or a per-try timeout is retried.
    pub fn retries_reset(&self) -> bool {
        self.on_reset || self.on_5xx || self.on_gateway_error
    }

    /// The pause before retry number `n` (1-based): jittered, doubling, at most 10x the base.
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 2u32.saturating_pow(n.saturating_sub(1)).min(10);
        let ceiling = self.backoff * factor;
        let millis = u64::try_from(ceiling.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        Duration::from_millis(rand::rng().random_range(0..=millis))
    }
}

/// A request body read ahead so that it can be sent again.
#[derive(Debug)]
pub enum Replayable {
    /// The whole body, within the limit: every try gets a copy.
    Buffered(Vec<Frame<Bytes>>),
    /// Too large (or failed while reading): sent once, streaming, after what was read.
    Streaming(RequestBody),
}

impl Replayable {
    /// Reads `body` up to `limit` bytes.
    pub async fn read(mut body: RequestBody, limit: usize) -> Self {
        let mut frames = Vec::new();
        let mut size = 0usize;
        loop {
            if body.is_end_stream() {
                return Replayable::Buffered(frames);
            }
            match body.frame().await {
                None => return Replayable::Buffered(frames),
                Some(Ok(frame)) => {
                    size += frame.data_ref().map_or(0, Bytes::len);
                    frames.push(frame);
                    if size > limit {
                        return Replayable::Streaming(
                            Chained {
                                head: frames.into(),
                                rest: Some(body),
                                error: None,
                            }
                            .boxed(),
                        );
                    }
                }
                Some(Err(error)) => {
                    // The client's body failed: the try fails the same way after what was read.
                    return Replayable::Streaming(
                        Chained {
                            head: frames.into(),
                            rest: None,
                            error: Some(error),
                        }
                        .boxed(),
                    );
                }
            }
        }
    }

    /// Whether it can be sent more than once.
    pub fn can_replay(&self) -> bool {
        matches!(self, Replayable::Buffered(_))
    }

    /// A body for one try: a copy when buffered; the stream itself (once) otherwise.
    pub fn take(&mut self) -> Option<RequestBody> {
        match self {
            Replayable::Buffered(frames) => Some(
                Chained {
                    head: frames
                        .iter()
                        .map(|f| match f.data_ref() {
                            Some(data) => Frame::data(data.clone()),
                            None => Frame::trailers(f.trailers_ref().cloned().unwrap_or_default()),
                        })
                        .collect(),
                    rest: None,
                    error: None,
                }
                .boxed(),
            ),
            Replayable::Streaming(_) => {
                let taken = std::mem::replace(self, Replayable::Buffered(Vec::new()));
                match taken {
                    Replayable::Streaming(body) => {
                        // Mark as spent: an empty buffer that `can_replay` must not offer again.
                        *self = Replayable::Streaming(
                            http_body_util::Empty::new()
                                .map_err(|never| match never {})
                                .boxed(),
                        );
                        Some(body)
                    }
                    Replayable::Buffered(_) => None,
                }
            }
        }
    }
}

/// Frames already read, then the rest of the stream.
struct Chained {
    head: VecDeque<Frame<Bytes>>,
    rest: Option<RequestBody>,
    error: Option<BoxError>,
}

impl Body for Chained {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(frame) = self.head.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(error) = self.error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_empty()
            && self.error.is_none()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let head: u64 = self
            .head
            .iter()
            .map(|f| f.data_ref().map_or(0, |d| d.len() as u64))
            .sum();
        match &self.rest {
            None => SizeHint::with_exact(head),
            Some(rest) => {
                let r = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(head + r.lower());
                if let Some(upper) = r.upper() {
                    hint.set_upper(head + upper);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry(on: &[&str], codes: &[u32]) -> RetryPolicy {
        RetryPolicy::from_proto(&pb::Retry {
            attempts: 3,
            retry_on: on.iter().map(|s| s.to_string()).collect(),
            codes: codes.to_vec(),
            ..Default::default()
        })
    }

    #[test]
    fn retry_on_names_and_codes() {
        let default = retry(&[], &[]);
        assert!(default.retries_status(503, None));
        assert!(!default.retries_status(500, None));
        assert!(default.retries_status(200, Some(14)), "unavailable");
        assert!(default.retries_connect_failure());
        let gateway = retry(&["gateway-error"], &[]);
        assert!(gateway.retries_status(502, None) && gateway.retries_status(504, None));
        assert!(!gateway.retries_status(500, None));
        let five = retry(&["5xx", "409"], &[]);
        assert!(five.retries_status(500, None) && five.retries_status(409, None));
        assert!(five.retries_reset());
        let codes = retry(&[], &[500, 502]);
        assert!(codes.retries_status(500, None) && !codes.retries_status(503, None));
    }

    #[test]
    fn backoff_is_jittered_and_bounded() {
        let policy = retry(&[], &[]);
        for n in 1..10 {
            assert!(policy.backoff(n) <= DEFAULT_BACKOFF * 10);
        }
    }

    #[tokio::test]
    async fn small_bodies_replay_large_ones_stream_once() {
        let body = |n: usize| {
            http_body_util::Full::new(Bytes::from(vec![b'x'; n]))
                .map_err(|never| match never {})
                .boxed()
        };
        let mut small = Replayable::read(body(1000), REPLAY_LIMIT).await;
        assert!(small.can_replay());
        for _ in 0..3 {
            let bytes = small.take().unwrap().collect().await.unwrap().to_bytes();
            assert_eq!(bytes.len(), 1000);
        }
        let mut large = Replayable::read(body(REPLAY_LIMIT + 1), REPLAY_LIMIT).await;
        assert!(!large.can_replay());
        let bytes = large.take().unwrap().collect().await.unwrap().to_bytes();
        assert_eq!(bytes.len(), REPLAY_LIMIT + 1);
    }
}
