//! The pool's configuration file (JSON): which functions exist, where their templates are, and the limits.
//!
//! ```json
//! {"functions": {"hello": {"template": "/srv/templates/hello", "port": 5000},
//!                "report": {"template": "/srv/templates/report", "invoke_timeout_ms": 60000}},
//!  "max_sandboxes": 4, "max_host_mib": 2048, "prewarm": 2,
//!  "keep_alive_ms": 30000, "invoke_timeout_ms": 5000}
//! ```
//! - `max_sandboxes`: live sandboxes (VMM processes) at most, idle, parked or busy (default 4).
//! - `max_host_mib`: a cap on the sandboxes' host memory, counted as the sum of their PSS (so template pages
//!   shared through the page cache count once). A new sandbox starts only if the pool stays under it (when
//!   no sandbox exists, one may always start); idle ones are evicted, parked first, when the sandboxes grow
//!   past it. Default: no cap.
//! - `prewarm`: parked sandboxes (restored, then `vm.park`ed: they hold no guest memory) kept ready, so that
//!   a function without an idle sandbox is served by an in-place repurpose instead of a restore. Used ones
//!   are replaced in the background (default 0). `prewarm_function` names the template they are restored
//!   from (default: the first function by name); any template with the same layout repurposes in place.
//! - `keep_alive_ms`: an idle sandbox is destroyed after this long unused (parked ones are kept).
//! - `invoke_timeout_ms`: how long an invocation may wait for a sandbox, and separately for the guest's
//!   answer, before it gets 503 or 502; a function's own `invoke_timeout_ms` overrides it.
//!
//! Every template must have a vsock device. A sandbox runs in its own directory and its VMM is restored
//! with `--vsock cid=<the template's>,socket=`[`SANDBOX_VSOCK`] (relative to that directory), so templates
//! may name any socket path, and repurposing between templates keeps the sandbox's socket.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The vsock socket of a sandbox (relative: it resolves in the sandbox's directory).
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
    /// Overrides the pool's `invoke_timeout_ms` for this function.
    #[serde(default)]
    pub invoke_timeout_ms: Option<u64>,
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
    /// The sandboxes' host memory (sum of PSS) at most, in MiB; None: no cap.
    #[serde(default)]
    pub max_host_mib: Option<u64>,
    /// Parked sandboxes kept ready for functions without an idle sandbox.
    #[serde(default)]
    pub prewarm: usize,
    /// The function whose template parked sandboxes are restored from (default: the first by name).
    #[serde(default)]
    pub prewarm_function: Option<String>,
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
        if self.max_host_mib == Some(0) {
            return invalid("max_host_mib must be positive (leave it out for no cap)".into());
        }
        if self.prewarm > self.max_sandboxes {
            return invalid(format!(
                "prewarm ({}) cannot exceed max_sandboxes ({})",
                self.prewarm, self.max_sandboxes
            ));
        }
        if let Some(name) = &self.prewarm_function {
            if !self.functions.contains_key(name) {
                return invalid(format!("prewarm_function {name:?} is not a function"));
            }
        }
        for (name, f) in &self.functions {
            if !valid_name(name) {
                return invalid(format!(
                    "function name {name:?}: use 1-64 of [A-Za-z0-9_.-]"
                ));
            }
            if f.invoke_timeout_ms == Some(0) {
                return invalid(format!(
                    "function {name}: invoke_timeout_ms must be positive"
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

    /// How long an invocation of `function` may wait for a sandbox and for its answer.
    pub fn invoke_timeout(&self, function: &str) -> Duration {
        let ms = self
            .functions
            .get(function)
            .and_then(|f| f.invoke_timeout_ms)
            .unwrap_or(self.invoke_timeout_ms);
        Duration::from_millis(ms)
    }

    /// The function parked sandboxes are restored as (validated: it exists).
    pub fn prewarm_function(&self) -> &str {
        match &self.prewarm_function {
            Some(name) => name,
            None => self.functions.keys().next().map_or("", |k| k),
        }
    }

    /// The cap on the sandboxes' host memory, in bytes.
    pub fn max_host_bytes(&self) -> Option<u64> {
        self.max_host_mib.map(|mib| mib.saturating_mul(1 << 20))
    }
}

/// The CID of the template's vsock device (from its manifest's VM config), which a sandbox restored from
/// it must be given with its own socket.
pub fn template_vsock_cid(template: &Path) -> Result<u64, String> {
    let manifest = memory_template::format::read_manifest(template)
        .map_err(|e| format!("template {}: {e}", template.display()))?;
    manifest.vm_config["vsock"]["cid"].as_u64().ok_or_else(|| {
        format!(
            "template {} has no vsock device: the pool reaches functions over vsock",
            template.display()
        )
    })
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
        assert_eq!(c.invoke_timeout("a"), Duration::from_secs(5));
        assert_eq!((c.max_host_mib, c.prewarm), (None, 0));
        assert_eq!(c.prewarm_function(), "a");
    }

    #[test]
    fn parses_limits_and_per_function_timeouts() {
        let c = PoolConfig::parse(
            r#"{"functions": {"b": {"template": "/t/b"},
                              "a": {"template": "/t/a", "invoke_timeout_ms": 60000}},
                "max_host_mib": 64, "prewarm": 2, "prewarm_function": "b"}"#,
        )
        .unwrap();
        assert_eq!(c.invoke_timeout("a"), Duration::from_secs(60));
        assert_eq!(c.invoke_timeout("b"), Duration::from_secs(5));
        assert_eq!(c.max_host_bytes(), Some(64 << 20));
        assert_eq!((c.prewarm, c.prewarm_function()), (2, "b"));
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
            r#"{"functions": {"a": {"template": "/t"}}, "max_host_mib": 0}"#,
            r#"{"functions": {"a": {"template": "/t"}}, "prewarm": 5}"#,
            r#"{"functions": {"a": {"template": "/t"}}, "prewarm": 1, "prewarm_function": "b"}"#,
            r#"{"functions": {"a": {"template": "/t", "invoke_timeout_ms": 0}}}"#,
            "not json",
        ] {
            assert!(PoolConfig::parse(bad).is_err(), "{bad}");
        }
    }
}
