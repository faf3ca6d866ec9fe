//! The chained CNI plugin (CNI specification 1.0.0, plus STATUS from 1.1.0). It never changes the
//! pod's network itself: it passes `prevResult` through and asks the node agent to capture the
//! pod. Non-ambient pods cost one local round trip; if the agent is down they are not affected.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::protocol::{
    DEFAULT_AGENT_SOCKET, DEFAULT_ENROLLMENT_FILE, EnrollmentHint, PodEvent, Verdict,
};

/// Versions this plugin accepts.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// CNI error codes (spec section "Error").
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later.
    pub const TRY_AGAIN: u32 = 11;
    /// Plugin not available (STATUS).
    pub const NOT_AVAILABLE: u32 = 50;
    /// The node agent could not capture the pod.
    pub const CAPTURE_FAILED: u32 = 100;
}

/// A CNI error: printed as the spec's JSON on stdout, exit status 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// Spec error code.
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer explanation.
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error JSON for `version`.
    pub fn to_json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

/// The plugin's own settings, from its entry in the network configuration.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    prev_result: Option<Value>,
    #[serde(default)]
    agent_socket: Option<String>,
    #[serde(default)]
    enrollment_file: Option<String>,
    /// Fail ambient pods when the agent is unreachable (default). Off: let them start and queue
    /// them for the agent to capture when it returns.
    #[serde(default)]
    fail_closed: Option<bool>,
    #[serde(default)]
    agent_timeout_ms: Option<u64>,
    #[serde(default)]
    pending_dir: Option<String>,
}

/// What a run produced: stdout text and exit status.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// What to print on stdout.
    pub stdout: String,
    /// Process exit status.
    pub status: i32,
}

/// Runs one invocation with `env` (the CNI_* variables) and `stdin`.
pub fn run(env: &BTreeMap<String, String>, stdin: &str) -> Outcome {
    let command = env.get("CNI_COMMAND").map(String::as_str).unwrap_or("");
    let version = serde_json::from_str::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| "1.0.0".to_string());
    let result = match command {
        "VERSION" => Ok(Some(
            json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS}),
        )),
        "ADD" | "DEL" | "CHECK" | "STATUS" => {
            parse_conf(stdin).and_then(|conf| dispatch(command, env, &conf))
        }
        "" => Err(CniError::new(
            code::INVALID_ENV,
            "CNI_COMMAND is not set",
            "the runtime must set CNI_COMMAND to ADD, DEL, CHECK, STATUS or VERSION",
        )),
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!("unknown CNI_COMMAND {other:?}"),
            "expected ADD, DEL, CHECK, STATUS or VERSION",
        )),
    };
    match result {
        Ok(Some(value)) => Outcome {
            stdout: format!("{value}\n"),
            status: 0,
        },
        Ok(None) => Outcome {
            stdout: String::new(),
            status: 0,
        },
        Err(e) => Outcome {
            stdout: format!("{}\n", e.to_json(&version)),
            status: 1,
        },
    }
}

fn parse_conf(stdin: &str) -> Result<NetConf, CniError> {
    if stdin.trim().is_empty() {
        return Err(CniError::new(
            code::DECODE,
            "empty network configuration on stdin",
            "the runtime must pass the network configuration as JSON on stdin",
        ));
    }
    let conf: NetConf = serde_json::from_str(stdin).map_err(|e| {
        CniError::new(
            code::DECODE,
            "cannot decode the network configuration",
            format!("ambit-cni: stdin is not valid network configuration JSON: {e}"),
        )
    })?;
    let version = conf.cni_version.as_deref().unwrap_or("");
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("unsupported cniVersion {version:?}"),
            format!("ambit-cni supports {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    if conf.name.as_deref().unwrap_or("").is_empty()
        || conf.kind.as_deref().unwrap_or("").is_empty()
    {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "network configuration lacks name or type",
            "both \"name\" and \"type\" are required",
        ));
    }
    Ok(conf)
}

fn required<'a>(env: &'a BTreeMap<String, String>, name: &str) -> Result<&'a str, CniError> {
    env.get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("{name} is not set"),
                format!("the runtime must set {name} for this command"),
            )
        })
}

/// `K8S_POD_NAMESPACE=..;K8S_POD_NAME=..` from CNI_ARGS.
fn cni_args(env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    env.get("CNI_ARGS")
        .map(|args| {
            args.split(';')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn prev_ips(prev: &Value) -> Vec<String> {
    prev.get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address").and_then(Value::as_str))
        .map(|cidr| cidr.split('/').next().unwrap_or(cidr).to_string())
        .collect()
}

fn dispatch(
    command: &str,
    env: &BTreeMap<String, String>,
    conf: &NetConf,
) -> Result<Option<Value>, CniError> {
    let socket = conf.agent_socket.as_deref().unwrap_or(DEFAULT_AGENT_SOCKET);
    let timeout = Duration::from_millis(conf.agent_timeout_ms.unwrap_or(3000));
    if command == "STATUS" {
        return UnixStream::connect(socket).map(|_| None).map_err(|e| {
            CniError::new(
                code::NOT_AVAILABLE,
                "the Ambit node agent is not reachable",
                format!("connecting to {socket}: {e}"),
            )
        });
    }
    let container_id = required(env, "CNI_CONTAINERID")?;
    if command != "DEL" {
        required(env, "CNI_IFNAME")?;
    }
    let netns = if command == "DEL" {
        env.get("CNI_NETNS").cloned().unwrap_or_default()
    } else {
        required(env, "CNI_NETNS")?.to_string()
    };
    let prev = conf.prev_result.clone();
    if command == "ADD" && prev.is_none() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "ambit-cni must be chained after an interface plugin",
            "the network configuration has no prevResult: list ambit-cni after the plugin that creates the pod's interface (bridge, ptp, ...)",
        ));
    }
    let args = cni_args(env);
    let (Some(namespace), Some(name)) = (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME"))
    else {
        // Not a Kubernetes pod: nothing for the mesh to do.
        return Ok(if command == "ADD" { prev } else { None });
    };
    let event = PodEvent {
        command: command.to_string(),
        container_id: container_id.to_string(),
        netns,
        pod_namespace: namespace.clone(),
        pod_name: name.clone(),
        pod_uid: args.get("K8S_POD_UID").cloned().unwrap_or_default(),
        ips: prev.as_ref().map(prev_ips).unwrap_or_default(),
    };
    match ask_agent(socket, &event, timeout) {
        Ok(verdict) => match verdict.error {
            Some(error) if command != "DEL" => Err(CniError::new(
                code::CAPTURE_FAILED,
                format!("Ambit could not capture pod {namespace}/{name}"),
                error,
            )),
            _ => Ok(if command == "ADD" { prev } else { None }),
        },
        Err(e) if command == "DEL" => {
            // DEL must succeed: the agent cleans up from its own state when it returns.
            eprintln!(
                "ambit-cni: DEL for {namespace}/{name}: node agent unreachable ({e}); continuing"
            );
            Ok(None)
        }
        Err(e) => agent_down(command, conf, &event, socket, &e, prev),
    }
}

fn agent_down(
    command: &str,
    conf: &NetConf,
    event: &PodEvent,
    socket: &str,
    error: &str,
    prev: Option<Value>,
) -> Result<Option<Value>, CniError> {
    let hint_path = conf
        .enrollment_file
        .as_deref()
        .unwrap_or(DEFAULT_ENROLLMENT_FILE);
    let hint: Option<EnrollmentHint> = std::fs::read_to_string(hint_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let ambient = match &hint {
        Some(hint) => hint.is_ambient(&event.pod_namespace, &event.pod_name),
        // Without the agent and without its hint we cannot tell: treat as ambient (fail safe).
        None => true,
    };
    if !ambient {
        return Ok(if command == "ADD" { prev } else { None });
    }
    let pod = format!("{}/{}", event.pod_namespace, event.pod_name);
    if conf.fail_closed.unwrap_or(true) {
        return Err(CniError::new(
            code::TRY_AGAIN,
            format!("pod {pod} is ambient but the Ambit node agent is unreachable"),
            format!(
                "connecting to {socket}: {error}; the pod is not started uncaptured (set failClosed: false to start it and capture it when the agent returns)"
            ),
        ));
    }
    let dir = conf
        .pending_dir
        .clone()
        .unwrap_or_else(|| "/var/run/ambit/pending".to_string());
    let file = format!("{dir}/{}.json", event.container_id);
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&file, serde_json::to_vec(event).unwrap_or_default()));
    if let Err(e) = written {
        return Err(CniError::new(
            code::TRY_AGAIN,
            format!("pod {pod} is ambient, the agent is unreachable and it cannot be queued"),
            format!("writing {file}: {e}"),
        ));
    }
    eprintln!(
        "ambit-cni: {pod}: node agent unreachable ({error}); queued in {file} for capture when it returns"
    );
    Ok(if command == "ADD" { prev } else { None })
}

fn ask_agent(socket: &str, event: &PodEvent, timeout: Duration) -> Result<Verdict, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut line = serde_json::to_vec(event).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream.write_all(&line).map_err(|e| e.to_string())?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(|e| format!("no answer within {timeout:?}: {e}"))?;
    serde_json::from_str(&reply).map_err(|e| format!("unreadable answer {reply:?}: {e}"))
}
