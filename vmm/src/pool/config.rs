//! The pool's configuration file (JSON): which functions exist, where their templates are, and the limits.
//!
//! ```json
//! {"functions": {"hello": {"template": "/srv/templates/hello", "port": 5000}},
//!  "max_sandboxes": 4, "keep_alive_ms": 30000, "invoke_timeout_ms": 5000}
//! ```
//! A template must configure its vsock device with the relative socket path [`SANDBOX_VSOCK`]: every
//! sandbox runs in its own directory, so the same template serves many sandboxes and repurposing keeps the
//! device backend (the device set of every template is then the same).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The vsock socket path templates configure (relative: it resolves in each sandbox's directory).
pub const SANDBOX_VSOCK: &str = "vsock.sock";
/// The guest port `function` workloads listen on unless the configuration says otherwise.
pub const DEFAULT_PORT: u32 = 5000;
const MAX_FUNCTIONS: usize = 1024;
const MAX_SANDBOXES: usize = 256;
const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is larger than 1 MiB")]
    TooLarge(PathBuf),
    #[error("bad pool configuration: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("bad pool configuration: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    /// The template directory (a plain absolute path or `file:///DIR`).
    pub template: String,
    /// The guest's vsock port.
    #[serde(default = "default_port")]
    pub port: u32,
}

fn default_port() -> u32 {
    DEFAULT_PORT
}

fn default_max_sandboxes() -> usize {
    4
}

fn default_keep_alive_ms() -> u64 {
    30_000
}

fn default_invoke_timeout_ms() -> u64 {
    5_000
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub functions: BTreeMap<String, FunctionConfig>,
    /// Live sandboxes (VMM processes) at most, idle or busy.
    #[serde(default = "default_max_sandboxes")]
    pub max_sandboxes: usize,
    /// An idle sandbox is destroyed after this long unused.
    #[serde(default = "default_keep_alive_ms")]
    pub keep_alive_ms: u64,
    /// How long an invocation may wait for a sandbox, and separately for the guest's answer.
    #[serde(default = "default_invoke_timeout_ms")]
    pub invoke_timeout_ms: u64,
}

impl PoolConfig {
    pub fn from_file(path: &Path) -> Result<PoolConfig, ConfigError> {
        let read = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(path).map_err(read)?.len();
        if len > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge(path.to_path_buf()));
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        PoolConfig::parse(&text)
    }

    pub fn parse(text: &str) -> Result<PoolConfig, ConfigError> {
        let config: PoolConfig = serde_json::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |s: String| Err(ConfigError::Invalid(s));
        if self.functions.is_empty() || self.functions.len() > MAX_FUNCTIONS {
            return invalid(format!("need 1 to {MAX_FUNCTIONS} functions"));
        }
        if !(1..=MAX_SANDBOXES).contains(&self.max_sandboxes) {
            return invalid(format!("max_sandboxes must be 1 to {MAX_SANDBOXES}"));
        }
        if self.invoke_timeout_ms == 0 {
            return invalid("invoke_timeout_ms must be positive".into());
        }
        for (name, f) in &self.functions {
            if !valid_name(name) {
                return invalid(format!(
                    "function name {name:?}: use 1-64 of [A-Za-z0-9_.-]"
                ));
            }
            if crate::snapshot::url_to_path(&f.template).is_err() {
                return invalid(format!(
                    "function {name}: template {:?} must be an absolute path or file:///DIR",
                    f.template
                ));
            }
        }
        Ok(())
    }

    /// The function's template directory.
    pub fn template(&self, function: &str) -> Option<PathBuf> {
        let f = self.functions.get(function)?;
        crate::snapshot::url_to_path(&f.template).ok()
    }
}

/// Function names appear in URLs: keep them to a plain set.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_defaults() {
        let c = PoolConfig::parse(r#"{"functions": {"a": {"template": "file:///t/a"}}}"#).unwrap();
        assert_eq!(c.max_sandboxes, 4);
        assert_eq!(c.keep_alive_ms, 30_000);
        assert_eq!(c.functions["a"].port, DEFAULT_PORT);
        assert_eq!(c.template("a"), Some(PathBuf::from("/t/a")));
        assert_eq!(c.template("b"), None);
    }

    #[test]
    fn rejects_bad_configurations() {
        for bad in [
            r#"{"functions": {}}"#,
            r#"{"functions": {"a": {"template": "relative"}}}"#,
            r#"{"functions": {"a/b": {"template": "/t"}}}"#,
            r#"{"functions": {"a": {"template": "/t"}}, "max_sandboxes": 0}"#,
            r#"{"functions": {"a": {"template": "/t"}}, "invoke_timeout_ms": 0}"#,
            r#"{"functions": {"a": {"template": "/t", "extra": 1}}}"#,
            r#"{"functions": {"a": {"template": "/t"}}, "unknown": 1}"#,
            "not json",
        ] {
            assert!(PoolConfig::parse(bad).is_err(), "{bad}");
        }
    }
}
