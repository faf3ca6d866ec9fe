//! The lab test's checks of `ambitctl explain` (called from the demo test in `lab.rs`): for a
//! matrix of flows in the running demo, what `ambitctl explain -o json` says and what the same
//! request really gets must agree. Allowed: the answering pod is one of the backends explain
//! named. Refused by the mesh with an HTTP status (403 at the waypoint): curl sees that status.
//! Refused at L4: the connection gives curl nothing.
//!
//! The lab at this point runs the demo plus the lab test's namespace-wide DENY for
//! `demo/client`'s identity and Istio's canary example on `product-service`.

use serde_json::Value;

/// One flow: `--from`, `--to`, extra explain arguments, the URL curl asks, curl's extra
/// arguments.
struct Case {
    what: &'static str,
    from: &'static str,
    to: String,
    explain: Vec<&'static str>,
    url: String,
    curl: Vec<&'static str>,
    /// The verdict explain must give (so the matrix keeps covering each kind of flow).
    outcome: &'static str,
}

/// Checks `ambitctl explain` against the running demo lab.
pub(crate) fn check(_status: &Value) {
    let echo_1 = super::pod_ip("demo/echo-1");
    let client = super::pod_ip("demo/client");
    let echo = "echo.demo.svc.cluster.local";
    let cases = [
        Case {
            what: "service call through the waypoint (90/10 split)",
            from: "demo/client",
            to: format!("{echo}:80"),
            explain: vec![],
            url: format!("http://{echo}/"),
            curl: vec![],
            outcome: "allowed",
        },
        Case {
            what: "canary header routed to v2",
            from: "demo/client",
            to: format!("{echo}:80"),
            explain: vec!["--header", "x-canary=true"],
            url: format!("http://{echo}/"),
            curl: vec!["-H", "x-canary: true"],
            outcome: "allowed",
        },
        Case {
            what: "L7 refusal of /admin at the waypoint",
            from: "demo/client",
            to: format!("{echo}:80"),
            explain: vec!["--path", "/admin"],
            url: format!("http://{echo}/admin"),
            curl: vec![],
            outcome: "denied",
        },
        Case {
            what: "pod-IP call denied at L4 (DENY for the client's identity)",
            from: "demo/client",
            to: format!("{echo_1}:8080"),
            explain: vec![],
            url: format!("http://{echo_1}:8080/"),
            curl: vec![],
            outcome: "denied",
        },
        Case {
            what: "pod-IP call allowed at L4 (echo's identity, no policy against it)",
            from: "demo/echo-1",
            to: format!("{client}:8080"),
            explain: vec![],
            url: format!("http://{client}:8080/"),
            curl: vec![],
            outcome: "allowed",
        },
        Case {
            what: "client outside the mesh refused by echo's ALLOW policy",
            from: "legacy/client",
            to: format!("{echo_1}:8080"),
            explain: vec![],
            url: format!("http://{echo_1}:8080/"),
            curl: vec![],
            outcome: "denied",
        },
        Case {
            what: "client outside the mesh admitted by PERMISSIVE",
            from: "legacy/client",
            to: format!("{client}:8080"),
            explain: vec![],
            url: format!("http://{client}:8080/"),
            curl: vec![],
            outcome: "allowed",
        },
        Case {
            what: "VirtualService canary subset",
            from: "demo/client",
            to: "product-service.demo.svc.cluster.local:80".to_string(),
            explain: vec!["--header", "x-canary=true"],
            url: "http://product-service.demo.svc.cluster.local/".to_string(),
            curl: vec!["-H", "x-canary: true"],
            outcome: "allowed",
        },
    ];
    for case in &cases {
        agree(case);
    }

    // The text report names the hops (a quick look at the human form).
    let (code, out, err) = super::ambitctl(&[
        "explain",
        "--from",
        "demo/client",
        "--to",
        &format!("{echo}:80"),
        "--path",
        "/admin",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    for line in [
        "3. Waypoint   in the path: Gateway demo/waypoint",
        "DENY  demo/echo-no-admin: rule 0 matches   <- decides",
        "Verdict      DENIED [403]",
    ] {
        assert!(out.contains(line), "{line:?} missing from:\n{out}");
    }
    // A flow that cannot be explained says why and exits 2.
    let (code, _, err) = super::ambitctl(&["explain", "--from", "demo/nobody", "--to", "echo:80"]);
    assert_eq!(code, 2);
    assert!(err.contains("there is no Pod demo/nobody"), "{err}");
}

/// Runs explain and the real request for `case` and asserts they agree.
fn agree(case: &Case) {
    let mut args = vec![
        "explain", "--from", case.from, "--to", &case.to, "-o", "json",
    ];
    args.extend(case.explain.iter().copied());
    let (code, out, err) = super::ambitctl(&args);
    let explained: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("{}: explain printed no JSON ({e}): {out}{err}", case.what));
    let verdict = &explained["verdict"];
    assert_eq!(
        verdict["outcome"], case.outcome,
        "{}: {}",
        case.what, verdict
    );
    let allowed = verdict["allowed"] == true;
    assert_eq!(
        code,
        if allowed { 0 } else { 1 },
        "{}: exit code",
        case.what
    );
    let backends: Vec<String> = verdict["backends"]
        .as_array()
        .map(|b| {
            b.iter()
                .filter_map(|p| p.as_str())
                .map(|p| p.rsplit('/').next().unwrap_or(p).to_string())
                .collect()
        })
        .unwrap_or_default();
    // The real request (a few times when several backends can answer, so a wrong set shows).
    let tries = if allowed { 4 } else { 1 };
    for _ in 0..tries {
        let mut extra = vec!["-i"];
        extra.extend(case.curl.iter().copied());
        let answer = super::curl_with(case.from, &extra, &case.url);
        let status = answer
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u16>().ok());
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or_default();
        if allowed {
            let seen: Value = serde_json::from_str(body.trim()).unwrap_or_default();
            let pod = seen["pod"].as_str().unwrap_or_default();
            assert_eq!(status, Some(200), "{}: {answer}", case.what);
            assert!(
                backends.iter().any(|b| b == pod),
                "{}: answered by {pod:?}, explain named {backends:?}\n{answer}",
                case.what
            );
        } else if let Some(expected) = verdict["status"].as_u64() {
            assert_eq!(
                status.map(u64::from),
                Some(expected),
                "{}: explain says {verdict}\n{answer}",
                case.what
            );
        } else {
            assert_eq!(
                answer, "",
                "{}: explain says refused at L4 ({verdict}), but the request was answered",
                case.what
            );
        }
    }
    eprintln!(
        "explain agrees with the lab: {}: {} {:?}",
        case.what, case.outcome, backends
    );
}
