//! Typed configuration from environment variables.
//!
//! An [`EnvReader`] reads every variable a binary knows, collects every problem instead of
//! stopping at the first, and remembers what it read so the effective configuration can be logged
//! at start with secrets left out. The source is replaceable ([`EnvSource`]) so tests feed a map.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Display};
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use thiserror::Error;

/// Where variables come from.
pub trait EnvSource {
    /// The variable's value, if set.
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl EnvSource for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

impl EnvSource for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        BTreeMap::get(self, name).cloned()
    }
}

/// One bad variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The variable's name.
    pub name: String,
    /// The value as given (redacted for secrets).
    pub value: String,
    /// What was expected.
    pub expected: String,
}

impl Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={:?}: {}", self.name, self.value, self.expected)
    }
}

/// Every problem found while reading the configuration, one per line.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("invalid configuration:\n{}", .problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    /// The problems, in the order the variables were read.
    pub problems: Vec<ConfigProblem>,
}

const REDACTED: &str = "<redacted>";

/// Reads typed values, collecting every problem.
pub struct EnvReader<'a> {
    source: &'a dyn EnvSource,
    problems: Vec<ConfigProblem>,
    effective: BTreeMap<String, String>,
}

impl fmt::Debug for EnvReader<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvReader")
            .field("problems", &self.problems)
            .field("effective", &self.effective)
            .finish_non_exhaustive()
    }
}

impl<'a> EnvReader<'a> {
    /// A reader over `source`.
    pub fn new(source: &'a dyn EnvSource) -> Self {
        EnvReader {
            source,
            problems: Vec::new(),
            effective: BTreeMap::new(),
        }
    }

    fn raw(&self, name: &str) -> Option<String> {
        self.source.get(name).filter(|v| !v.is_empty())
    }

    fn record(&mut self, name: &str, shown: String) {
        self.effective.insert(name.to_string(), shown);
    }

    fn problem(&mut self, name: &str, value: &str, expected: impl Into<String>) {
        self.problems.push(ConfigProblem {
            name: name.to_string(),
            value: value.to_string(),
            expected: expected.into(),
        });
    }

    /// A string, or `default` when unset or empty.
    pub fn string(&mut self, name: &str, default: &str) -> String {
        let value = self.raw(name).unwrap_or_else(|| default.to_string());
        self.record(name, value.clone());
        value
    }

    /// A string, or `None` when unset or empty.
    pub fn optional_string(&mut self, name: &str) -> Option<String> {
        let value = self.raw(name);
        self.record(name, value.clone().unwrap_or_else(|| "<unset>".into()));
        value
    }

    /// A secret (token, key): never shown in [`EnvReader::effective`] or in problems.
    pub fn secret_string(&mut self, name: &str) -> Option<String> {
        let value = self.raw(name);
        self.record(
            name,
            if value.is_some() {
                REDACTED.into()
            } else {
                "<unset>".into()
            },
        );
        value
    }

    /// A string that must be set.
    pub fn required_string(&mut self, name: &str) -> Option<String> {
        let value = self.raw(name);
        match &value {
            Some(v) => self.record(name, v.clone()),
            None => self.problem(name, "", "must be set"),
        }
        value
    }

    /// Any `FromStr` value, or `default` when unset.
    pub fn parse<T>(&mut self, name: &str, default: T) -> T
    where
        T: FromStr + Display,
        T::Err: Display,
    {
        let Some(raw) = self.raw(name) else {
            self.record(name, default.to_string());
            return default;
        };
        match raw.trim().parse::<T>() {
            Ok(v) => {
                self.record(name, v.to_string());
                v
            }
            Err(e) => {
                self.problem(name, &raw, e.to_string());
                default
            }
        }
    }

    /// A boolean: true/false, 1/0, yes/no, on/off (any case).
    pub fn bool(&mut self, name: &str, default: bool) -> bool {
        let Some(raw) = self.raw(name) else {
            self.record(name, default.to_string());
            return default;
        };
        match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => {
                self.record(name, "true".into());
                true
            }
            "false" | "0" | "no" | "off" => {
                self.record(name, "false".into());
                false
            }
            _ => {
                self.problem(name, &raw, "expected true or false");
                default
            }
        }
    }

    /// A duration such as `30s`, `5m`, `24h`, `1h30m`; a bare number is seconds.
    pub fn duration(&mut self, name: &str, default: Duration) -> Duration {
        let Some(raw) = self.raw(name) else {
            self.record(name, humantime::format_duration(default).to_string());
            return default;
        };
        match parse_duration(&raw) {
            Some(v) => {
                self.record(name, humantime::format_duration(v).to_string());
                v
            }
            None => {
                self.problem(name, &raw, "expected a duration such as 30s, 5m or 24h");
                default
            }
        }
    }

    /// A socket address such as `127.0.0.1:15000` or `[::]:15008`.
    pub fn socket_addr(&mut self, name: &str, default: SocketAddr) -> SocketAddr {
        let Some(raw) = self.raw(name) else {
            self.record(name, default.to_string());
            return default;
        };
        match raw.trim().parse::<SocketAddr>() {
            Ok(v) => {
                self.record(name, v.to_string());
                v
            }
            Err(_) => {
                self.problem(
                    name,
                    &raw,
                    "expected an address such as 127.0.0.1:15000 or [::]:15008",
                );
                default
            }
        }
    }

    /// A `sep`-separated list with empty items dropped; empty when unset.
    pub fn list(&mut self, name: &str, sep: char) -> Vec<String> {
        let items: Vec<String> = self
            .raw(name)
            .map(|raw| {
                raw.split(sep)
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        self.record(name, items.join(&sep.to_string()));
        items
    }

    /// Records a problem found while combining values (e.g. two options that exclude each other).
    pub fn invalid(&mut self, name: &str, value: &str, expected: impl Into<String>) {
        self.problem(name, value, expected);
    }

    /// The variables read and their final values, secrets redacted, sorted by name.
    pub fn effective(&self) -> Vec<(String, String)> {
        self.effective
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Ok when every variable was valid; otherwise every problem at once.
    pub fn finish(self) -> Result<Vec<(String, String)>, ConfigError> {
        if self.problems.is_empty() {
            Ok(self.effective())
        } else {
            Err(ConfigError {
                problems: self.problems,
            })
        }
    }
}

/// Parses `30s`, `5m`, `1h30m`, `250ms`, or a bare number of seconds.
pub fn parse_duration(raw: &str) -> Option<Duration> {
    let raw = raw.trim();
    if let Ok(secs) = raw.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    humantime::parse_duration(raw).ok()
}

/// [`parse_duration`] for command-line parsers: an error that says what is accepted.
pub fn parse_duration_arg(raw: &str) -> Result<Duration, String> {
    parse_duration(raw).ok_or_else(|| {
        format!("{raw:?} is not a duration (examples: 250ms, 30s, 5m, 1h30m, or seconds)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_apply_when_unset() {
        let source = env(&[]);
        let mut r = EnvReader::new(&source);
        assert_eq!(r.string("A", "x"), "x");
        assert_eq!(r.parse::<u32>("B", 100), 100);
        assert!(r.bool("C", true));
        assert_eq!(
            r.duration("D", Duration::from_secs(300)),
            Duration::from_secs(300)
        );
        assert_eq!(r.optional_string("E"), None);
        assert_eq!(r.list("F", ','), Vec::<String>::new());
        let effective = r.finish().unwrap();
        assert!(effective.contains(&("D".into(), "5m".into())));
    }

    #[test]
    fn good_values_parse() {
        let source = env(&[
            ("N", "42"),
            ("B", "Yes"),
            ("D", "1h30m"),
            ("S", "90"),
            ("ADDR", "[::]:15008"),
            ("L", "a, b,,c"),
        ]);
        let mut r = EnvReader::new(&source);
        assert_eq!(r.parse::<u32>("N", 1), 42);
        assert!(r.bool("B", false));
        assert_eq!(r.duration("D", Duration::ZERO), Duration::from_secs(5400));
        assert_eq!(r.duration("S", Duration::ZERO), Duration::from_secs(90));
        assert_eq!(
            r.socket_addr("ADDR", "0.0.0.0:1".parse().unwrap()).port(),
            15008
        );
        assert_eq!(r.list("L", ','), vec!["a", "b", "c"]);
        r.finish().unwrap();
    }

    #[test]
    fn every_problem_is_reported_at_once_with_name_and_value() {
        let source = env(&[
            ("POOL_UNUSED_RELEASE_TIMEOUT", "five minutes"),
            ("POOL_MAX_STREAMS_PER_CONNECTION", "lots"),
            ("TLS12_ENABLED", "maybe"),
            ("ADMIN_ADDR", "localhost"),
        ]);
        let mut r = EnvReader::new(&source);
        r.duration("POOL_UNUSED_RELEASE_TIMEOUT", Duration::from_secs(300));
        r.parse::<u32>("POOL_MAX_STREAMS_PER_CONNECTION", 100);
        r.bool("TLS12_ENABLED", false);
        r.socket_addr("ADMIN_ADDR", "127.0.0.1:15000".parse().unwrap());
        r.required_string("NODE_NAME");
        let err = r.finish().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration:\n  \
             POOL_UNUSED_RELEASE_TIMEOUT=\"five minutes\": expected a duration such as 30s, 5m or 24h\n  \
             POOL_MAX_STREAMS_PER_CONNECTION=\"lots\": invalid digit found in string\n  \
             TLS12_ENABLED=\"maybe\": expected true or false\n  \
             ADMIN_ADDR=\"localhost\": expected an address such as 127.0.0.1:15000 or [::]:15008\n  \
             NODE_NAME=\"\": must be set"
        );
    }

    #[test]
    fn secrets_are_redacted() {
        let source = env(&[("AUTH_TOKEN", "hunter2")]);
        let mut r = EnvReader::new(&source);
        assert_eq!(r.secret_string("AUTH_TOKEN").as_deref(), Some("hunter2"));
        let effective = r.finish().unwrap();
        assert_eq!(
            effective,
            vec![("AUTH_TOKEN".to_string(), "<redacted>".to_string())]
        );
        assert!(!format!("{effective:?}").contains("hunter2"));
    }
}
