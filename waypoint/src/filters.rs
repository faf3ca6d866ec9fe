//! Gateway API filters applied to a request or its response: header modifiers, redirects, URL
//! rewrites. Mirrors are collected for the caller to send. Pure functions over `http` types.

use ambit_proto::waypoint as pb;
use http::header::{HOST, LOCATION};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, Uri};

/// What the request filters decided.
#[derive(Debug, Default)]
pub struct Applied {
    /// A redirect to answer instead of forwarding.
    pub redirect: Option<Response<()>>,
    /// Response header modifiers to apply to the answer, in order.
    pub response: Vec<pb::HeaderModifier>,
    /// Mirrors to send (backend and fraction).
    pub mirrors: Vec<pb::RequestMirror>,
}

/// Applies `filters` to the request `parts` in order. `matched_prefix` is the PathPrefix that
/// matched (for `ReplacePrefixMatch`); `scheme` the request's scheme.
pub fn apply_request(
    filters: &[pb::Filter],
    parts: &mut http::request::Parts,
    matched_prefix: Option<&str>,
    applied: &mut Applied,
) {
    for filter in filters {
        match &filter.kind {
            Some(pb::filter::Kind::RequestHeaderModifier(m)) => {
                modify_headers(&mut parts.headers, m)
            }
            Some(pb::filter::Kind::ResponseHeaderModifier(m)) => applied.response.push(m.clone()),
            Some(pb::filter::Kind::RequestRedirect(r)) if applied.redirect.is_none() => {
                applied.redirect = Some(redirect(r, parts, matched_prefix));
            }
            Some(pb::filter::Kind::RequestRedirect(_)) => {}
            Some(pb::filter::Kind::UrlRewrite(r)) => rewrite(r, parts, matched_prefix),
            Some(pb::filter::Kind::RequestMirror(m)) => applied.mirrors.push(m.clone()),
            None => {}
        }
    }
}

/// Applies a header modifier: set replaces, add appends, remove deletes (names case-insensitive).
pub fn modify_headers(headers: &mut HeaderMap, modifier: &pb::HeaderModifier) {
    for h in &modifier.set {
        if let Some((name, value)) = header(h) {
            headers.insert(name, value);
        }
    }
    for h in &modifier.add {
        if let Some((name, value)) = header(h) {
            headers.append(name, value);
        }
    }
    for name in &modifier.remove {
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(name);
        }
    }
}

fn header(h: &pb::Header) -> Option<(HeaderName, HeaderValue)> {
    Some((
        HeaderName::from_bytes(h.name.as_bytes()).ok()?,
        HeaderValue::from_str(&h.value).ok()?,
    ))
}

/// The request's host without port: the Host header (HTTP/1.1) or the URI authority (HTTP/2).
pub fn request_host(parts: &http::request::Parts) -> Option<String> {
    let raw = parts
        .headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.as_str().to_string()))?;
    let authority: Authority = raw.parse().ok()?;
    Some(authority.host().to_string())
}

/// The path after a `PathModifier`.
fn modified_path(modifier: &pb::PathModifier, path: &str, matched_prefix: Option<&str>) -> String {
    match modifier.r#type() {
        pb::PathModifierType::Full => modifier.value.clone(),
        pb::PathModifierType::PrefixMatch => {
            let prefix = matched_prefix.unwrap_or("");
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            if rest.is_empty() {
                return modifier.value.clone();
            }
            let replaced = format!("{}{rest}", modifier.value.trim_end_matches('/'));
            if replaced.is_empty() {
                "/".to_string()
            } else {
                replaced
            }
        }
    }
}

fn with_query(path: &str, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    }
}

fn rewrite(r: &pb::UrlRewrite, parts: &mut http::request::Parts, matched_prefix: Option<&str>) {
    if !r.hostname.is_empty()
        && let Ok(value) = HeaderValue::from_str(&r.hostname)
    {
        parts.headers.insert(HOST, value);
        if parts.uri.authority().is_some() {
            let mut uri = parts.uri.clone().into_parts();
            uri.authority = r.hostname.parse().ok();
            if let Ok(new) = Uri::from_parts(uri) {
                parts.uri = new;
            }
        }
    }
    if let Some(modifier) = &r.path {
        let path = modified_path(modifier, parts.uri.path(), matched_prefix);
        let pq = with_query(&path, parts.uri.query());
        let mut uri = parts.uri.clone().into_parts();
        if let Ok(pq) = pq.parse::<PathAndQuery>() {
            uri.path_and_query = Some(pq);
            if let Ok(new) = Uri::from_parts(uri) {
                parts.uri = new;
            }
        }
    }
}

fn default_port(scheme: &str) -> u16 {
    if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        80
    }
}

fn redirect(
    r: &pb::RequestRedirect,
    parts: &http::request::Parts,
    matched_prefix: Option<&str>,
) -> Response<()> {
    let request_scheme = parts.uri.scheme_str().unwrap_or("http").to_string();
    let scheme = if r.scheme.is_empty() {
        request_scheme.clone()
    } else {
        r.scheme.clone()
    };
    let host = if r.hostname.is_empty() {
        request_host(parts).unwrap_or_default()
    } else {
        r.hostname.clone()
    };
    // The port: the one asked for; else, when the scheme changes, the new scheme's default
    // (left out); else the request's own port.
    let request_port = parts
        .headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<Authority>().ok())
        .and_then(|a| a.port_u16());
    let port = if r.port != 0 {
        u16::try_from(r.port).ok()
    } else if !r.scheme.is_empty() && !r.scheme.eq_ignore_ascii_case(&request_scheme) {
        None
    } else {
        request_port
    }
    .filter(|p| *p != default_port(&scheme));
    let path = match &r.path {
        Some(modifier) => modified_path(modifier, parts.uri.path(), matched_prefix),
        None => parts.uri.path().to_string(),
    };
    let mut location = format!("{scheme}://{host}");
    if let Some(port) = port {
        location.push_str(&format!(":{port}"));
    }
    location.push_str(&with_query(&path, parts.uri.query()));
    let status = match r.status_code {
        301 => StatusCode::MOVED_PERMANENTLY,
        _ => StatusCode::FOUND,
    };
    let mut response = Response::new(());
    *response.status_mut() = status;
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(LOCATION, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, host: &str) -> http::request::Parts {
        let (parts, ()) = http::Request::builder()
            .uri(uri)
            .header(HOST, host)
            .body(())
            .unwrap()
            .into_parts();
        parts
    }

    fn prefix(value: &str) -> Option<pb::PathModifier> {
        Some(pb::PathModifier {
            r#type: pb::PathModifierType::PrefixMatch as i32,
            value: value.into(),
        })
    }

    #[test]
    fn replace_prefix_match_follows_the_spec_table() {
        let m = prefix("/bar").unwrap();
        assert_eq!(modified_path(&m, "/foo/baz", Some("/foo")), "/bar/baz");
        assert_eq!(modified_path(&m, "/foo", Some("/foo")), "/bar");
        let root = prefix("/").unwrap();
        assert_eq!(modified_path(&root, "/foo/bar", Some("/foo")), "/bar");
        assert_eq!(modified_path(&root, "/foo", Some("/foo")), "/");
        let slash = prefix("/bar/").unwrap();
        assert_eq!(modified_path(&slash, "/foo/baz", Some("/foo")), "/bar/baz");
    }

    #[test]
    fn header_modifier_sets_adds_and_removes() {
        let mut headers = HeaderMap::new();
        headers.insert("x-a", "old".parse().unwrap());
        headers.insert("x-gone", "1".parse().unwrap());
        modify_headers(
            &mut headers,
            &pb::HeaderModifier {
                set: vec![pb::Header {
                    name: "X-A".into(),
                    value: "new".into(),
                }],
                add: vec![pb::Header {
                    name: "x-a".into(),
                    value: "more".into(),
                }],
                remove: vec!["X-Gone".into()],
            },
        );
        let values: Vec<_> = headers.get_all("x-a").iter().collect();
        assert_eq!(values, ["new", "more"]);
        assert!(headers.get("x-gone").is_none());
    }

    #[test]
    fn redirect_builds_the_location() {
        let mut applied = Applied::default();
        let mut p = parts("/old/page?q=1", "echo.demo:8080");
        apply_request(
            &[pb::Filter {
                kind: Some(pb::filter::Kind::RequestRedirect(pb::RequestRedirect {
                    scheme: "https".into(),
                    hostname: "new.example".into(),
                    port: 0,
                    path: prefix("/new"),
                    status_code: 301,
                })),
            }],
            &mut p,
            Some("/old"),
            &mut applied,
        );
        let r = applied.redirect.unwrap();
        assert_eq!(r.status(), 301);
        assert_eq!(r.headers()[LOCATION], "https://new.example/new/page?q=1");

        let mut applied = Applied::default();
        let mut p = parts("/x", "echo.demo:8080");
        apply_request(
            &[pb::Filter {
                kind: Some(pb::filter::Kind::RequestRedirect(pb::RequestRedirect {
                    hostname: "other".into(),
                    ..Default::default()
                })),
            }],
            &mut p,
            None,
            &mut applied,
        );
        let r = applied.redirect.unwrap();
        assert_eq!(r.status(), 302);
        assert_eq!(r.headers()[LOCATION], "http://other:8080/x");
    }

    #[test]
    fn url_rewrite_changes_host_and_path_keeping_the_query() {
        let mut applied = Applied::default();
        let mut p = parts("/api/v1/items?limit=2", "echo.demo");
        apply_request(
            &[pb::Filter {
                kind: Some(pb::filter::Kind::UrlRewrite(pb::UrlRewrite {
                    hostname: "backend.internal".into(),
                    path: prefix("/v2"),
                })),
            }],
            &mut p,
            Some("/api/v1"),
            &mut applied,
        );
        assert_eq!(p.uri.to_string(), "/v2/items?limit=2");
        assert_eq!(p.headers[HOST], "backend.internal");
        assert!(applied.redirect.is_none());
    }
}

/// What a rule's CORS policy does with a request.
#[derive(Debug)]
pub enum Cors {
    /// A preflight from an allowed origin: answered by the waypoint.
    Preflight(Response<()>),
    /// A request from an allowed origin: these headers go on its response.
    Allow(pb::HeaderModifier),
    /// No `Origin`, or one the policy does not allow: the request passes untouched.
    None,
}

fn origin_allowed(cors: &pb::CorsPolicy, origin: &str) -> bool {
    cors.allow_origins.iter().any(|m| match m.r#type() {
        pb::MatchType::Exact => m.value == "*" || m.value == origin,
        pb::MatchType::PrefixString | pb::MatchType::Prefix => origin.starts_with(&m.value),
        pb::MatchType::Regex => {
            regex::Regex::new(&format!("^(?:{})$", m.value)).is_ok_and(|re| re.is_match(origin))
        }
    })
}

/// Applies a VirtualService `corsPolicy` as Envoy's CORS filter does: a preflight (`OPTIONS`
/// with `Origin` and `Access-Control-Request-Method`) from an allowed origin is answered here;
/// other requests from an allowed origin get `Access-Control-Allow-Origin` (and the exposed
/// headers and credentials flag) on their response.
pub fn cors(cors: &pb::CorsPolicy, parts: &http::request::Parts) -> Cors {
    let Some(origin) = parts
        .headers
        .get(http::header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    else {
        return Cors::None;
    };
    if !origin_allowed(cors, origin) {
        return Cors::None;
    }
    let mut allow = vec![pb::Header {
        name: "access-control-allow-origin".into(),
        value: origin.to_string(),
    }];
    if cors.allow_credentials {
        allow.push(pb::Header {
            name: "access-control-allow-credentials".into(),
            value: "true".into(),
        });
    }
    let preflight = parts.method == http::Method::OPTIONS
        && parts
            .headers
            .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD);
    if preflight {
        let mut response = Response::new(());
        if !cors.allow_methods.is_empty() {
            allow.push(pb::Header {
                name: "access-control-allow-methods".into(),
                value: cors.allow_methods.join(","),
            });
        }
        if !cors.allow_headers.is_empty() {
            allow.push(pb::Header {
                name: "access-control-allow-headers".into(),
                value: cors.allow_headers.join(","),
            });
        }
        if let Some(max_age) = cors
            .max_age
            .as_ref()
            .and_then(|d| std::time::Duration::try_from(*d).ok())
        {
            allow.push(pb::Header {
                name: "access-control-max-age".into(),
                value: max_age.as_secs().to_string(),
            });
        }
        modify_headers(
            response.headers_mut(),
            &pb::HeaderModifier {
                set: allow,
                ..Default::default()
            },
        );
        return Cors::Preflight(response);
    }
    if !cors.expose_headers.is_empty() {
        allow.push(pb::Header {
            name: "access-control-expose-headers".into(),
            value: cors.expose_headers.join(","),
        });
    }
    Cors::Allow(pb::HeaderModifier {
        set: allow,
        ..Default::default()
    })
}

#[cfg(test)]
mod cors_tests {
    use super::*;

    fn request(method: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut builder = http::Request::builder().method(method).uri("/");
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn preflights_are_answered_and_allowed_origins_marked() {
        let policy = pb::CorsPolicy {
            allow_origins: vec![pb::StringMatch {
                name: String::new(),
                r#type: pb::MatchType::PrefixString as i32,
                value: "https://app.".into(),
            }],
            allow_methods: vec!["GET".into(), "POST".into()],
            allow_headers: vec!["x-token".into()],
            max_age: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            allow_credentials: true,
            ..Default::default()
        };
        let preflight = request(
            "OPTIONS",
            &[
                ("origin", "https://app.example"),
                ("access-control-request-method", "POST"),
            ],
        );
        let Cors::Preflight(answer) = cors(&policy, &preflight) else {
            panic!("not answered");
        };
        let h = answer.headers();
        assert_eq!(h["access-control-allow-origin"], "https://app.example");
        assert_eq!(h["access-control-allow-methods"], "GET,POST");
        assert_eq!(h["access-control-max-age"], "600");
        assert_eq!(h["access-control-allow-credentials"], "true");
        let simple = request("GET", &[("origin", "https://app.example")]);
        assert!(matches!(cors(&policy, &simple), Cors::Allow(_)));
        let other = request("GET", &[("origin", "https://evil.example")]);
        assert!(matches!(cors(&policy, &other), Cors::None));
        assert!(matches!(cors(&policy, &request("GET", &[])), Cors::None));
    }
}
