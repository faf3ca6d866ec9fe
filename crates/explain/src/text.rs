//! The explanation as a hop-by-hop report for a terminal.

use std::fmt::Write as _;

use crate::report::{Endpoint, Explanation, Hop, Outcome};

impl Explanation {
    /// A readable hop-by-hop report.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let f = &self.flow;
        let mut request = String::new();
        if let (Some(method), Some(path)) = (&f.method, &f.path) {
            request = format!("  {method} {path}");
        }
        for h in &f.headers {
            let _ = write!(request, "  {}: {}", h.name, h.value);
        }
        let _ = writeln!(out, "Flow         {} -> {}{request}", f.from, f.to);

        let s = &self.source;
        let _ = writeln!(
            out,
            "\n1. Source     {} on {}, {}",
            s.pod,
            if s.node.is_empty() { "?" } else { &s.node },
            s.ip.as_deref().unwrap_or("no IP")
        );
        if s.captured {
            let _ = writeln!(out, "             identity {}", s.identity);
        } else {
            let _ = writeln!(
                out,
                "             identity none on the wire (not captured; its service account would be {})",
                s.identity
            );
        }
        let _ = writeln!(
            out,
            "             captured: {} ({})",
            yes(s.captured),
            s.enrollment
        );

        let d = &self.destination;
        let _ = writeln!(
            out,
            "\n2. Dest       {}:{} -> {} ({})",
            d.host, d.port, d.ip, d.resolved
        );
        match (&d.service, &d.workload) {
            (Some(svc), _) => {
                let port = match (svc.port, svc.target_port) {
                    (Some(p), Some(t)) => format!("port {p} -> target port {t}"),
                    (Some(p), None) => format!("port {p} -> a named target port"),
                    (None, _) => format!("no port {}", d.port),
                };
                let _ = writeln!(
                    out,
                    "             Service {} ({}), {port}, protocol {}",
                    svc.service, svc.hostname, svc.app_protocol
                );
                if d.endpoints.is_empty() {
                    let _ = writeln!(out, "             endpoints: none");
                }
                for e in &d.endpoints {
                    let _ = writeln!(out, "             endpoint {}", endpoint_line(e));
                }
            }
            (None, Some(w)) => {
                let _ = writeln!(out, "             pod {}", endpoint_line(w));
            }
            (None, None) => {
                let _ = writeln!(out, "             not a mesh address");
            }
        }

        let w = &self.waypoint;
        let head = if w.in_path {
            format!(
                "in the path: Gateway {}{}",
                w.gateway.as_deref().unwrap_or("?"),
                match (&w.pod, &w.ip) {
                    (Some(pod), Some(ip)) => format!(" (pod {pod}, {ip})"),
                    _ => String::new(),
                }
            )
        } else {
            "not in the path".to_string()
        };
        let _ = writeln!(out, "\n3. Waypoint   {head}");
        let _ = writeln!(out, "             why: {}", w.reason);

        if let Some(r) = &self.route {
            let what = match r.decision.as_str() {
                "matched" => format!(
                    "{} rule {}{} matches",
                    r.route.as_deref().unwrap_or("?"),
                    r.rule.unwrap_or(0),
                    r.rule_name
                        .as_deref()
                        .map(|n| format!(" ({n})"))
                        .unwrap_or_default()
                ),
                "no-match" => "routes attach to the port, none matches (404)".to_string(),
                "pod-addressed" => "pod-addressed: no routes, straight to the pod".to_string(),
                _ => "no route attaches to the port: the Service itself".to_string(),
            };
            let _ = writeln!(out, "\n4. Route      [{}] {what}", r.protocol);
            if !r.filters.is_empty() {
                let _ = writeln!(out, "             filters: {}", r.filters.join(", "));
            }
            if let Some(redirect) = &r.redirect {
                let _ = writeln!(out, "             redirect: {redirect}");
            }
            for b in &r.backends {
                let subset = b
                    .subset
                    .as_deref()
                    .map(|s| format!(" subset {s}"))
                    .unwrap_or_default();
                let pods: Vec<&str> = b.endpoints.iter().map(|e| e.pod.as_str()).collect();
                let tail = match &b.problem {
                    Some(problem) => format!("FAILS: {problem}"),
                    None => pods.join(", "),
                };
                let _ = writeln!(
                    out,
                    "             backend {}:{}{subset} weight {} -> {tail}",
                    b.service, b.port, b.weight
                );
            }
        }

        if !self.hops.is_empty() {
            let _ = writeln!(out, "\n5. Policy");
            for (i, hop) in self.hops.iter().enumerate() {
                if i > 0 {
                    let _ = writeln!(out);
                }
                hop_text(&mut out, hop);
            }
        }

        let v = &self.verdict;
        let word = match v.outcome {
            Outcome::Allowed => "ALLOWED",
            Outcome::PartlyDenied => "PARTLY DENIED",
            Outcome::Denied => "DENIED",
            Outcome::RefusedStrict => "REFUSED (STRICT)",
            Outcome::NoRoute => "NO ROUTE",
            Outcome::Redirected => "REDIRECTED",
            Outcome::InvalidBackend => "INVALID BACKEND",
            Outcome::NoHealthyEndpoint => "NO HEALTHY ENDPOINT",
            Outcome::UnknownPort => "UNKNOWN PORT",
            Outcome::NoWaypoint => "NO WAYPOINT",
        };
        let status = v.status.map(|s| format!(" [{s}]")).unwrap_or_default();
        let _ = writeln!(out, "\nVerdict      {word}{status}: {}", v.summary);
        if !self.warnings.is_empty() {
            let _ = writeln!(out, "\nWarnings");
            for w in &self.warnings {
                let _ = writeln!(out, "  {w}");
            }
        }
        out
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn endpoint_line(e: &Endpoint) -> String {
    let mut notes = Vec::new();
    if !e.healthy {
        notes.push("NOT READY");
    }
    if !e.captured {
        notes.push("not captured");
    }
    if !e.eligible {
        notes.push("not eligible");
    }
    format!(
        "{} {}{} on {}{}",
        e.pod,
        e.ip,
        e.port.map(|p| format!(":{p}")).unwrap_or_default(),
        e.node,
        if notes.is_empty() {
            String::new()
        } else {
            format!(" ({})", notes.join(", "))
        }
    )
}

fn hop_text(out: &mut String, hop: &Hop) {
    let layer = if hop.l7 { "L7" } else { "L4" };
    let peer = hop
        .peer
        .as_deref()
        .map_or("plaintext, no identity".to_string(), |p| {
            format!("peer {p}")
        });
    let _ = writeln!(
        out,
        "   at {} [{layer}] ({peer}, from {} to {})",
        hop.at, hop.source_ip, hop.destination
    );
    if hop.policies.is_empty() {
        let _ = writeln!(out, "      no policy applies");
    }
    for p in &hop.policies {
        let matched = match p.rule {
            Some(rule) => format!("rule {rule} matches"),
            None => "no match".to_string(),
        };
        let dry = if p.dry_run { " (dry run)" } else { "" };
        let decides = if p.decides { "   <- decides" } else { "" };
        let _ = writeln!(
            out,
            "      {:<5} {}{dry}: {matched}{decides}",
            p.action, p.policy
        );
    }
    let mark = if hop.allowed { "allowed" } else { "DENIED" };
    let reason = ["allowed: ", "allowed ", "denied: ", "denied "]
        .iter()
        .find_map(|p| hop.reason.strip_prefix(p))
        .unwrap_or(&hop.reason);
    let _ = writeln!(out, "      => {mark}: {reason}");
}
