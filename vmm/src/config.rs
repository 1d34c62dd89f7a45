//! VM configuration: the Cloud Hypervisor-compatible `VmConfig` (defined in `api::models`, re-exported here)
//! and the parsers for the CLI's `key=value,key=value` option strings.

use std::path::PathBuf;

// The models live in the API crate, where `vm.create` parses them; the CLI builds the same types.
pub use api::models::{
    host_memory_mib, ConfigError, ConsoleConfig, ConsoleMode, CpuTopology, CpuTopologyConfig,
    CpusConfig, MemoryConfig, PayloadConfig, VmConfig, DEFAULT_MEMORY_MIB, MAX_VCPUS,
    MIN_MEMORY_MIB,
};

/// A parsed `key=value,key=value` option string. A bare word (no `=`) is kept as a key with an empty value,
/// so `--serial tty` and `--serial file=/x` share one parser.
pub struct OptionParser {
    option: &'static str,
    raw: String,
    pairs: Vec<(String, String)>,
}

impl OptionParser {
    pub fn parse(option: &'static str, raw: &str, known: &[&str]) -> Result<Self, ConfigError> {
        let mut pairs = Vec::new();
        for item in raw.split(',') {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let (k, v) = item.split_once('=').unwrap_or((item, ""));
            if !known.contains(&k) {
                return Err(ConfigError::UnknownParam {
                    option,
                    param: k.to_string(),
                    known: known.join(", "),
                });
            }
            if pairs.iter().any(|(seen, _): &(String, String)| seen == k) {
                return Err(Self::invalid_raw(option, raw, format!("'{k}' given twice")));
            }
            pairs.push((k.to_string(), v.to_string()));
        }
        Ok(OptionParser {
            option,
            raw: raw.to_string(),
            pairs,
        })
    }

    fn invalid_raw(option: &'static str, raw: &str, reason: String) -> ConfigError {
        ConfigError::Invalid {
            option,
            value: raw.to_string(),
            reason,
        }
    }

    pub fn invalid(&self, reason: impl Into<String>) -> ConfigError {
        Self::invalid_raw(self.option, &self.raw, reason.into())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some("on") | Some("true") | Some("") => Ok(Some(true)),
            Some("off") | Some("false") => Ok(Some(false)),
            Some(v) => Err(self.invalid(format!("{key}={v}: expected on or off"))),
        }
    }

    pub fn u8(&self, key: &str) -> Result<Option<u8>, ConfigError> {
        self.get(key)
            .map(|v| {
                v.parse::<u8>().map_err(|_| {
                    self.invalid(format!("{key}={v}: expected a number from 0 to 255"))
                })
            })
            .transpose()
    }

    pub fn size(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        self.get(key)
            .map(|v| {
                parse_size(v).ok_or_else(|| {
                    self.invalid(format!("{key}={v}: expected a size like 512M or 2G"))
                })
            })
            .transpose()
    }
}

/// Parses sizes as Cloud Hypervisor does: a number of bytes with an optional K, M or G suffix.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, shift) = match text.chars().last()? {
        'K' | 'k' => (&text[..text.len() - 1], 10),
        'M' | 'm' => (&text[..text.len() - 1], 20),
        'G' | 'g' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

pub fn parse_cpus(raw: &str) -> Result<CpusConfig, ConfigError> {
    let p = OptionParser::parse("--cpus", raw, &["boot", "max", "topology", "max_phys_bits"])?;
    let boot = p.u8("boot")?.unwrap_or(1);
    let max = p.u8("max")?.unwrap_or(boot);
    let topology = p
        .get("topology")
        .map(|t| {
            let parts: Vec<Option<u8>> = t.split(':').map(|n| n.parse().ok()).collect();
            match parts.as_slice() {
                [Some(threads), Some(cores), Some(dies), Some(packages)]
                    if *threads > 0 && *cores > 0 && *dies > 0 && *packages > 0 =>
                {
                    Ok(CpuTopology {
                        threads_per_core: *threads,
                        cores_per_die: *cores,
                        dies_per_package: *dies,
                        packages: *packages,
                    })
                }
                _ => Err(p.invalid(format!(
                    "topology={t}: expected threads_per_core:cores_per_die:dies_per_package:packages"
                ))),
            }
        })
        .transpose()?;
    if let Some(t) = &topology {
        let total = t.threads_per_core as u32
            * t.cores_per_die as u32
            * t.dies_per_package as u32
            * t.packages as u32;
        if total != max as u32 {
            return Err(p.invalid(format!("topology describes {total} vCPUs but max is {max}")));
        }
    }
    let cpus = CpusConfig {
        boot_vcpus: boot,
        max_vcpus: max,
        topology,
        max_phys_bits: p.u8("max_phys_bits")?,
        ..Default::default()
    };
    Ok(cpus)
}

pub fn parse_memory(raw: &str) -> Result<MemoryConfig, ConfigError> {
    let p = OptionParser::parse(
        "--memory",
        raw,
        &[
            "size",
            "shared",
            "hugepages",
            "prefault",
            "thp",
            "mergeable",
            "hotplug_size",
            "hotplug_method",
        ],
    )?;
    for ignored in ["mergeable", "hotplug_size", "hotplug_method"] {
        if p.has(ignored) {
            log::warn!("--memory {ignored}= is not supported by trenv yet; ignored");
        }
    }
    let defaults = MemoryConfig::default();
    Ok(MemoryConfig {
        size: p.size("size")?.unwrap_or(defaults.size),
        shared: p.bool("shared")?.unwrap_or(defaults.shared),
        hugepages: p.bool("hugepages")?.unwrap_or(defaults.hugepages),
        prefault: p.bool("prefault")?.unwrap_or(defaults.prefault),
        thp: p.bool("thp")?.unwrap_or(defaults.thp),
        ..defaults
    })
}

/// `off`, `null`, `tty`, `pty`, `file=PATH`, `socket=PATH`.
pub fn parse_console(option: &'static str, raw: &str) -> Result<ConsoleConfig, ConfigError> {
    let p = OptionParser::parse(
        option,
        raw,
        &["off", "null", "tty", "pty", "file", "socket"],
    )?;
    let mut modes = Vec::new();
    for (mode, key) in [
        (ConsoleMode::Off, "off"),
        (ConsoleMode::Null, "null"),
        (ConsoleMode::Tty, "tty"),
        (ConsoleMode::Pty, "pty"),
        (ConsoleMode::File, "file"),
        (ConsoleMode::Socket, "socket"),
    ] {
        if p.has(key) {
            modes.push(mode);
        }
    }
    let [mode] = modes.as_slice() else {
        return Err(
            p.invalid("expected exactly one of off, null, tty, pty, file=PATH, socket=PATH")
        );
    };
    let path_of = |key: &str| -> Result<Option<PathBuf>, ConfigError> {
        match p.get(key) {
            Some("") => Err(p.invalid(format!("{key}= needs a path"))),
            Some(path) => Ok(Some(PathBuf::from(path))),
            None => Ok(None),
        }
    };
    Ok(ConsoleConfig {
        file: path_of("file")?,
        socket: path_of("socket")?,
        ..ConsoleConfig::with_mode(*mode)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1k"), Some(1024));
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("-1M"), None);
        assert_eq!(parse_size("99999999999999999G"), None);
    }

    #[test]
    fn cpus() {
        let c = parse_cpus("boot=2").unwrap();
        assert_eq!((c.boot_vcpus, c.max_vcpus), (2, 2));
        let c = parse_cpus("boot=2,max=4,topology=1:2:1:2").unwrap();
        assert_eq!(c.max_vcpus, 4);
        assert!(parse_cpus("boot=two").is_err());
        assert!(parse_cpus("bot=2").is_err());
        assert!(parse_cpus("boot=2,max=4,topology=1:2:1:1").is_err());
        assert!(parse_cpus("boot=2,boot=3").is_err());
    }

    #[test]
    fn memory() {
        let m = parse_memory("size=256M,shared=on").unwrap();
        assert_eq!(m.size, 256 << 20);
        assert!(m.shared && m.thp);
        assert!(parse_memory("size=lots").is_err());
        assert!(parse_memory("shared=maybe").is_err());
    }

    #[test]
    fn consoles() {
        assert_eq!(
            parse_console("--serial", "tty").unwrap().mode,
            ConsoleMode::Tty
        );
        assert_eq!(
            parse_console("--serial", "off").unwrap().mode,
            ConsoleMode::Off
        );
        let f = parse_console("--serial", "file=/tmp/x").unwrap();
        assert_eq!(f.mode, ConsoleMode::File);
        assert_eq!(f.file.unwrap(), PathBuf::from("/tmp/x"));
        assert!(parse_console("--serial", "file=").is_err());
        assert!(parse_console("--serial", "tty,off").is_err());
        assert!(parse_console("--serial", "bogus").is_err());
    }
}
