//! Multi-document YAML into typed objects. One bad object is reported (naming the file, the
//! document, the object and the field) and never hides the others.

use std::path::Path;

use serde::Deserialize;
use thiserror::Error;

use crate::objects::{
    AuthorizationPolicy, Namespace, Object, ObjectKey, ObjectMeta, PeerAuthentication, Pod, Service,
};
use crate::validate;

/// An object that could not be accepted.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{source_name}{}: {object}: {field}: {reason}", document_suffix(*.document))]
pub struct ObjectError {
    /// The file (or other source) it came from.
    pub source_name: String,
    /// 1-based document index in that source; 0 when the source holds one object per entry (an
    /// API server), and the message leaves it out.
    pub document: usize,
    /// `Kind namespace/name`, or what is known of it.
    pub object: String,
    /// The field at fault (dotted path), or `-` for the whole document.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    items: Vec<serde_json::Value>,
}

fn document_suffix(document: usize) -> String {
    if document == 0 {
        String::new()
    } else {
        format!(" doc {document}")
    }
}

/// Parses one object as an API server returns it (a JSON value). `source_name` prefixes errors
/// (say `Kubernetes`). A `List` yields its items. Kinds this crate does not model come back as
/// [`Object::Other`].
pub fn parse_object(
    value: serde_json::Value,
    source_name: &str,
) -> (Vec<Object>, Vec<ObjectError>) {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    parse_value(value, source_name, 0, &mut objects, &mut errors);
    (objects, errors)
}

/// A DNS-1123 label: lowercase alphanumerics and '-', 1-63 characters, alphanumeric at both ends.
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A DNS-1123 subdomain: dot-separated labels, at most 253 characters.
pub fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

/// Parses every document of `text`.
pub fn parse_documents(text: &str, source_name: &str) -> (Vec<Object>, Vec<ObjectError>) {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let document_no = index + 1;
        let value = match serde_json::Value::deserialize(document) {
            Ok(serde_json::Value::Null) => continue,
            Ok(value) => value,
            Err(e) => {
                errors.push(ObjectError {
                    source_name: source_name.to_string(),
                    document: document_no,
                    object: "?".into(),
                    field: "-".into(),
                    reason: format!("not valid YAML: {e}"),
                });
                // The YAML stream cannot be trusted past a syntax error.
                break;
            }
        };
        parse_value(value, source_name, document_no, &mut objects, &mut errors);
    }
    (objects, errors)
}

fn parse_value(
    value: serde_json::Value,
    source_name: &str,
    document: usize,
    objects: &mut Vec<Object>,
    errors: &mut Vec<ObjectError>,
) {
    let error = |object: String, field: &str, reason: String| ObjectError {
        source_name: source_name.to_string(),
        document,
        object,
        field: field.to_string(),
        reason,
    };
    let header: Header = match serde_json::from_value(value.clone()) {
        Ok(h) => h,
        Err(e) => {
            errors.push(error(
                "?".into(),
                "-",
                format!("not a Kubernetes object: {e}"),
            ));
            return;
        }
    };
    if header.kind == "List" {
        for item in header.items {
            parse_value(item, source_name, document, objects, errors);
        }
        return;
    }
    let key = ObjectKey {
        kind: header.kind.clone(),
        namespace: header.metadata.namespace.clone(),
        name: header.metadata.name.clone(),
    };
    let named = if header.kind.is_empty() {
        "object without kind".to_string()
    } else {
        key.to_string()
    };
    if header.kind.is_empty() {
        errors.push(error(named, "kind", "required".into()));
        return;
    }
    if header.api_version.is_empty() {
        errors.push(error(named, "apiVersion", "required".into()));
        return;
    }
    if !is_dns_subdomain(&header.metadata.name) {
        errors.push(error(
            named,
            "metadata.name",
            format!(
                "{:?} is not a valid name (lowercase letters, digits, '-' and '.')",
                header.metadata.name
            ),
        ));
        return;
    }
    let result = match header.kind.as_str() {
        "Namespace" => typed::<Namespace>(value).map(Object::Namespace),
        "Pod" => typed::<Pod>(value)
            .and_then(|pod| validate_pod(&pod).map(|()| pod))
            .map(Object::Pod),
        "Service" => typed::<Service>(value)
            .and_then(|s| validate_service(&s).map(|()| s))
            .map(Object::Service),
        "AuthorizationPolicy" if header.api_version.starts_with("security.istio.io/") => {
            typed::<AuthorizationPolicy>(value)
                .and_then(|p| validate_authorization(&p).map(|()| p))
                .map(Object::AuthorizationPolicy)
        }
        "PeerAuthentication" if header.api_version.starts_with("security.istio.io/") => {
            typed::<PeerAuthentication>(value)
                .and_then(|p| validate_peer_authentication(&p).map(|()| p))
                .map(Object::PeerAuthentication)
        }
        "Gateway" if group(&header.api_version) == "gateway.networking.k8s.io" => {
            checked(value, validate::gateway).map(Object::Gateway)
        }
        "GatewayClass" if group(&header.api_version) == "gateway.networking.k8s.io" => {
            checked(value, validate::gateway_class).map(Object::GatewayClass)
        }
        "HTTPRoute" if group(&header.api_version) == "gateway.networking.k8s.io" => {
            checked(value, validate::http_route).map(Object::HttpRoute)
        }
        "GRPCRoute" if group(&header.api_version) == "gateway.networking.k8s.io" => {
            checked(value, validate::grpc_route).map(Object::GrpcRoute)
        }
        "DestinationRule" if group(&header.api_version) == "networking.istio.io" => {
            checked(value, validate::destination_rule).map(Object::DestinationRule)
        }
        "VirtualService" if group(&header.api_version) == "networking.istio.io" => {
            checked(value, crate::virtual_service::validate).map(Object::VirtualService)
        }
        "EndpointSlice" if group(&header.api_version) == "discovery.k8s.io" => {
            checked(value, validate::endpoint_slice).map(Object::EndpointSlice)
        }
        "Node" if header.api_version == "v1" => checked(value, validate::node).map(Object::Node),
        _ => Ok(Object::Other {
            key,
            api_version: header.api_version,
            value,
        }),
    };
    match result {
        Ok(object) => objects.push(object),
        Err((field, reason)) => errors.push(error(named, &field, reason)),
    }
}

/// The API group of an `apiVersion` (`""` for the core group).
fn group(api_version: &str) -> &str {
    api_version.split_once('/').map_or("", |(group, _)| group)
}

fn checked<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
    check: fn(&T) -> Result<(), (String, String)>,
) -> Result<T, (String, String)> {
    let object = typed::<T>(value)?;
    check(&object)?;
    Ok(object)
}

fn typed<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, (String, String)> {
    serde_json::from_value(value).map_err(|e| {
        let text = e.to_string();
        ("-".to_string(), text)
    })
}

fn validate_pod(pod: &Pod) -> Result<(), (String, String)> {
    if pod.metadata.namespace.is_empty() {
        return Err(("metadata.namespace".into(), "required for a Pod".into()));
    }
    if !is_dns_label(&pod.metadata.namespace) {
        return Err((
            "metadata.namespace".into(),
            format!("{:?} is not a valid namespace name", pod.metadata.namespace),
        ));
    }
    for (i, ip) in pod.ips().iter().enumerate() {
        if ip.parse::<std::net::IpAddr>().is_err() {
            let field = if i == 0 && !pod.status.pod_ip.is_empty() {
                "status.podIP".to_string()
            } else {
                "status.podIPs".to_string()
            };
            return Err((field, format!("{ip:?} is not an IP address")));
        }
    }
    Ok(())
}

use validate::require_namespace;

fn validate_service(service: &Service) -> Result<(), (String, String)> {
    require_namespace(&service.metadata)?;
    for ip in std::iter::once(&service.spec.cluster_ip).chain(&service.spec.cluster_ips) {
        if !ip.is_empty() && ip != "None" && ip.parse::<std::net::IpAddr>().is_err() {
            return Err((
                "spec.clusterIP".into(),
                format!("{ip:?} is not an IP address"),
            ));
        }
    }
    for (i, port) in service.spec.ports.iter().enumerate() {
        if port.port == 0 {
            return Err((format!("spec.ports[{i}].port"), "must be 1-65535".into()));
        }
        match &port.target_port {
            None | Some(serde_json::Value::String(_)) => {}
            Some(serde_json::Value::Number(n))
                if n.as_u64().is_some_and(|n| (1..=65535).contains(&n)) => {}
            Some(other) => {
                return Err((
                    format!("spec.ports[{i}].targetPort"),
                    format!("{other} is not a port number or name"),
                ));
            }
        }
    }
    Ok(())
}

fn validate_cidr(value: &str) -> bool {
    let (ip, len) = value.split_once('/').unwrap_or((value, ""));
    let Ok(ip) = ip.parse::<std::net::IpAddr>() else {
        return false;
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    len.is_empty() || len.parse::<u8>().is_ok_and(|l| l <= max)
}

fn validate_authorization(policy: &AuthorizationPolicy) -> Result<(), (String, String)> {
    require_namespace(&policy.metadata)?;
    let action = policy.spec.action.as_str();
    if !matches!(action, "" | "ALLOW" | "DENY" | "AUDIT" | "CUSTOM") {
        return Err((
            "spec.action".into(),
            format!("{action:?} is not ALLOW, DENY, AUDIT or CUSTOM"),
        ));
    }
    for (r, rule) in policy.spec.rules.iter().flatten().enumerate() {
        for (f, from) in rule.from.iter().enumerate() {
            let s = &from.source;
            for (field, values) in [
                ("ipBlocks", &s.ip_blocks),
                ("notIpBlocks", &s.not_ip_blocks),
                ("remoteIpBlocks", &s.remote_ip_blocks),
                ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
            ] {
                if let Some(bad) = values.iter().find(|v| !validate_cidr(v)) {
                    return Err((
                        format!("spec.rules[{r}].from[{f}].source.{field}"),
                        format!("{bad:?} is not an IP address or CIDR"),
                    ));
                }
            }
        }
        for (t, to) in rule.to.iter().enumerate() {
            for (field, values) in [
                ("ports", &to.operation.ports),
                ("notPorts", &to.operation.not_ports),
            ] {
                if let Some(bad) = values
                    .iter()
                    .find(|v| v.parse::<u16>().map_or(true, |p| p == 0))
                {
                    return Err((
                        format!("spec.rules[{r}].to[{t}].operation.{field}"),
                        format!("{bad:?} is not a port number"),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn validate_peer_authentication(pa: &PeerAuthentication) -> Result<(), (String, String)> {
    require_namespace(&pa.metadata)?;
    let mode = pa.spec.mtls.as_ref().map(|m| m.mode.as_str()).unwrap_or("");
    if !matches!(mode, "" | "UNSET" | "STRICT" | "PERMISSIVE" | "DISABLE") {
        return Err((
            "spec.mtls.mode".into(),
            format!("{mode:?} is not STRICT, PERMISSIVE, DISABLE or UNSET"),
        ));
    }
    Ok(())
}

/// Reads every `*.yaml`/`*.yml` file in `dir` (sorted by name).
pub fn read_dir(dir: &Path) -> std::io::Result<(Vec<Object>, Vec<ObjectError>)> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    paths.sort();
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let (o, e) = parse_documents(&text, &name);
        objects.extend(o);
        errors.extend(e);
    }
    Ok((objects, errors))
}
