//! VM configuration: the Cloud Hypervisor-compatible `VmConfig` (the same JSON shapes `vm.create` takes) and
//! the parsers for the CLI's `key=value,key=value` option strings.
//!
//! Config is what a human or orchestrator writes; it is kept apart from runtime state so that it can be
//! stored, shown by `vm.info`, and reused to restore.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid {option} option '{value}': {reason}")]
    Invalid {
        option: &'static str,
        value: String,
        reason: String,
    },
    #[error("unknown parameter '{param}' in {option} option (known: {known})")]
    UnknownParam {
        option: &'static str,
        param: String,
        known: String,
    },
    #[error("no kernel given: pass --kernel PATH (or payload.kernel)")]
    MissingKernel,
    #[error("memory size {size} MiB is too small: at least {min} MiB is needed")]
    MemoryTooSmall { size: u64, min: u64 },
    #[error("memory size {size} MiB is more than this host's {host} MiB of RAM")]
    MemoryTooLarge { size: u64, host: u64 },
    #[error("boot_vcpus must be between 1 and max_vcpus ({max}); got {boot}")]
    BadVcpuCount { boot: u8, max: u8 },
    #[error("the command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong { len: usize, max: usize },
}

/// Smallest guest we accept: the boot structures, ACPI area and a kernel must fit.
pub const MIN_MEMORY_MIB: u64 = 8;
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// x86 APIC ids of xAPIC mode fit in 8 bits; 255 is the broadcast id.
pub const MAX_VCPUS: u8 = 254;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuTopologyConfig {
    pub threads_per_core: u8,
    pub cores_per_die: u8,
    pub dies_per_package: u8,
    pub packages: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    pub boot_vcpus: u8,
    pub max_vcpus: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<CpuTopologyConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_phys_bits: Option<u8>,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 1,
            topology: None,
            max_phys_bits: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Bytes.
    pub size: u64,
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub hugepages: bool,
    #[serde(default)]
    pub prefault: bool,
    #[serde(default = "default_true")]
    pub thp: bool,
}

fn default_true() -> bool {
    true
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: DEFAULT_MEMORY_MIB << 20,
            shared: false,
            hugepages: false,
            prefault: false,
            thp: true,
        }
    }
}

/// Where a console's output goes (Cloud Hypervisor's `ConsoleOutputMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    Off,
    Pty,
    Tty,
    File,
    Socket,
    Null,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    pub mode: ConsoleMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

impl ConsoleConfig {
    pub fn with_mode(mode: ConsoleMode) -> Self {
        ConsoleConfig {
            mode,
            file: None,
            socket: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default)]
    pub payload: PayloadConfig,
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    #[serde(default = "default_serial")]
    pub serial: ConsoleConfig,
    #[serde(default = "default_console")]
    pub console: ConsoleConfig,
}

fn default_serial() -> ConsoleConfig {
    ConsoleConfig::with_mode(ConsoleMode::Null)
}

fn default_console() -> ConsoleConfig {
    ConsoleConfig::with_mode(ConsoleMode::Off)
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            payload: PayloadConfig::default(),
            cpus: CpusConfig::default(),
            memory: MemoryConfig::default(),
            serial: default_serial(),
            console: default_console(),
        }
    }
}

impl VmConfig {
    /// Checks what can be checked without touching the host's devices.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.payload.kernel.is_none() {
            return Err(ConfigError::MissingKernel);
        }
        let cpus = &self.cpus;
        if cpus.boot_vcpus == 0 || cpus.boot_vcpus > cpus.max_vcpus || cpus.max_vcpus > MAX_VCPUS {
            return Err(ConfigError::BadVcpuCount {
                boot: cpus.boot_vcpus,
                max: cpus.max_vcpus.min(MAX_VCPUS),
            });
        }
        let size_mib = self.memory.size >> 20;
        if size_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall {
                size: size_mib,
                min: MIN_MEMORY_MIB,
            });
        }
        if let Some(host_mib) = host_memory_mib() {
            if size_mib > host_mib {
                return Err(ConfigError::MemoryTooLarge {
                    size: size_mib,
                    host: host_mib,
                });
            }
        }
        if let Some(cmdline) = &self.payload.cmdline {
            let max = crate::arch::layout::CMDLINE_MAX_SIZE - 1;
            if cmdline.len() > max {
                return Err(ConfigError::CmdlineTooLong {
                    len: cmdline.len(),
                    max,
                });
            }
        }
        Ok(())
    }
}

/// The host's physical RAM, the ceiling for one guest's memory.
pub fn host_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib >> 10)
}

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
                    Ok(CpuTopologyConfig {
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
        mode: *mode,
        file: path_of("file")?,
        socket: path_of("socket")?,
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

    #[test]
    fn validation() {
        let mut c = VmConfig::default();
        assert_eq!(c.validate(), Err(ConfigError::MissingKernel));
        c.payload.kernel = Some("/k".into());
        c.validate().unwrap();
        c.memory.size = 1 << 20;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::MemoryTooSmall { .. })
        ));
        c.memory.size = 1 << 60;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
        c.memory.size = 256 << 20;
        c.cpus.boot_vcpus = 0;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::BadVcpuCount { .. })
        ));
    }

    #[test]
    fn json_shape_is_cloud_hypervisor_compatible() {
        let json = r#"{"payload":{"kernel":"/k","cmdline":"console=ttyS0"},
            "cpus":{"boot_vcpus":2,"max_vcpus":2},"memory":{"size":268435456},
            "serial":{"mode":"Tty"},"console":{"mode":"Off"}}"#;
        let c: VmConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.cpus.boot_vcpus, 2);
        assert_eq!(c.serial.mode, ConsoleMode::Tty);
        assert!(serde_json::from_str::<VmConfig>(r#"{"cpus":{"boot_vcpus":"x"}}"#).is_err());
    }
}
