//! `VmConfig`, the body of `vm.create` and the `config` of `vm.info`, and its checks.
//!
//! Config is what a human or orchestrator writes; it is kept apart from runtime state so that it can be
//! stored, shown by `vm.info`, and reused to restore.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::devices::*;

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
    #[error("cpus.topology describes {topology} vCPUs but max_vcpus is {max}")]
    BadTopology { topology: u32, max: u8 },
    #[error("the command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("invalid {section} configuration: {reason}")]
    InvalidSection {
        section: &'static str,
        reason: String,
    },
    #[error("device id '{0}' is used more than once")]
    DuplicateId(String),
}

/// Smallest guest we accept: the boot structures, ACPI area and a kernel must fit.
pub const MIN_MEMORY_MIB: u64 = 8;
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// x86 APIC ids of xAPIC mode fit in 8 bits; 255 is the broadcast id.
pub const MAX_VCPUS: u8 = 254;
/// Size of the guest's command-line area, terminating NUL included (the VMM's memory layout reserves it).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// The virtio-fs tag field is 36 bytes (virtio spec 5.11.4).
pub const MAX_FS_TAG_LEN: usize = 36;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
pub struct CpuTopology {
    pub threads_per_core: u8,
    pub cores_per_die: u8,
    pub dies_per_package: u8,
    pub packages: u8,
}

/// The name this type had before it moved into the API crate.
pub type CpuTopologyConfig = CpuTopology;

impl CpuTopology {
    pub fn vcpus(&self) -> u32 {
        self.threads_per_core as u32
            * self.cores_per_die as u32
            * self.dies_per_package as u32
            * self.packages as u32
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuAffinity {
    pub vcpu: u8,
    pub host_cpus: Vec<usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    #[serde(default)]
    pub amx: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusConfig {
    pub boot_vcpus: u8,
    pub max_vcpus: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<CpuTopology>,
    #[serde(default)]
    pub kvm_hyperv: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_phys_bits: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Vec<CpuAffinity>>,
    #[serde(default)]
    pub features: CpuFeatures,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 1,
            topology: None,
            kvm_hyperv: false,
            max_phys_bits: None,
            affinity: None,
            features: CpuFeatures::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HotplugMethod {
    #[default]
    Acpi,
    VirtioMem,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryZoneConfig {
    pub id: String,
    /// Bytes.
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub hugepages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepage_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_numa_node: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplugged_size: Option<u64>,
    #[serde(default)]
    pub prefault: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Bytes.
    pub size: u64,
    #[serde(default)]
    pub mergeable: bool,
    #[serde(default)]
    pub hotplug_method: HotplugMethod,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplugged_size: Option<u64>,
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub hugepages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepage_size: Option<u64>,
    #[serde(default)]
    pub prefault: bool,
    #[serde(default = "default_true")]
    pub thp: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zones: Option<Vec<MemoryZoneConfig>>,
}

pub(crate) fn default_true() -> bool {
    true
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: DEFAULT_MEMORY_MIB << 20,
            mergeable: false,
            hotplug_method: HotplugMethod::Acpi,
            hotplug_size: None,
            hotplugged_size: None,
            shared: false,
            hugepages: false,
            hugepage_size: None,
            prefault: false,
            thp: true,
            zones: None,
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
pub struct ConsoleConfig {
    pub mode: ConsoleMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    #[serde(default)]
    pub iommu: bool,
}

impl ConsoleConfig {
    pub fn with_mode(mode: ConsoleMode) -> Self {
        ConsoleConfig {
            mode,
            file: None,
            socket: None,
            iommu: false,
        }
    }

    fn check(&self, section: &'static str) -> Result<(), ConfigError> {
        let reason = match self.mode {
            ConsoleMode::File if self.file.is_none() => "mode File needs a file",
            ConsoleMode::Socket if self.socket.is_none() => "mode Socket needs a socket",
            _ => return Ok(()),
        };
        Err(invalid(section, reason))
    }
}

pub const DEFAULT_NUM_PCI_SEGMENTS: u16 = 1;
/// Cloud Hypervisor's limit on x86_64.
pub const MAX_NUM_PCI_SEGMENTS: u16 = 96;

fn default_num_pci_segments() -> u16 {
    DEFAULT_NUM_PCI_SEGMENTS
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformConfig {
    #[serde(default = "default_num_pci_segments")]
    pub num_pci_segments: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_segments: Option<Vec<u16>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oem_strings: Option<Vec<String>>,
    #[serde(default)]
    pub tdx: bool,
    #[serde(default)]
    pub sev_snp: bool,
}

impl Default for PlatformConfig {
    fn default() -> Self {
        PlatformConfig {
            num_pci_segments: DEFAULT_NUM_PCI_SEGMENTS,
            iommu_segments: None,
            serial_number: None,
            uuid: None,
            oem_strings: None,
            tdx: false,
            sev_snp: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumaDistance {
    pub destination: u32,
    pub distance: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumaConfig {
    pub guest_numa_id: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distances: Option<Vec<NumaDistance>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_zones: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_segments: Option<Vec<u16>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpmConfig {
    pub socket: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    #[serde(default)]
    pub payload: PayloadConfig,
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<DiskConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<Vec<NetConfig>>,
    #[serde(default)]
    pub rng: RngConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<Vec<FsConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pmem: Option<Vec<PmemConfig>>,
    #[serde(default = "default_serial")]
    pub serial: ConsoleConfig,
    #[serde(default = "default_console")]
    pub console: ConsoleConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<DeviceConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_devices: Option<Vec<UserDeviceConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vdpa: Option<Vec<VdpaConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa: Option<Vec<NumaConfig>>,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub watchdog: bool,
    #[serde(default)]
    pub pvpanic: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmConfig>,
}

/// Cloud Hypervisor's default serial is Null.
fn default_serial() -> ConsoleConfig {
    ConsoleConfig::with_mode(ConsoleMode::Null)
}

/// Cloud Hypervisor defaults the virtio console to Tty; trenv has no virtio console yet, so an omitted
/// console means Off rather than a device we would have to refuse.
fn default_console() -> ConsoleConfig {
    ConsoleConfig::with_mode(ConsoleMode::Off)
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            payload: PayloadConfig::default(),
            cpus: CpusConfig::default(),
            memory: MemoryConfig::default(),
            disks: None,
            net: None,
            rng: RngConfig::default(),
            balloon: None,
            fs: None,
            pmem: None,
            serial: default_serial(),
            console: default_console(),
            devices: None,
            user_devices: None,
            vdpa: None,
            vsock: None,
            numa: None,
            iommu: false,
            watchdog: false,
            pvpanic: false,
            platform: None,
            tpm: None,
        }
    }
}

fn invalid(section: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::InvalidSection {
        section,
        reason: reason.into(),
    }
}

fn check_queues(
    section: &'static str,
    num_queues: usize,
    queue_size: u16,
) -> Result<(), ConfigError> {
    if num_queues == 0 {
        return Err(invalid(section, "num_queues must be at least 1"));
    }
    // Split virtqueues must be a power of two long (virtio spec 2.7).
    if !queue_size.is_power_of_two() {
        return Err(invalid(
            section,
            format!("queue_size {queue_size} is not a power of two"),
        ));
    }
    Ok(())
}

impl VmConfig {
    /// Checks what can be checked without touching the host's devices.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.payload.kernel.is_none() {
            return Err(ConfigError::MissingKernel);
        }
        self.validate_cpus()?;
        self.validate_memory()?;
        if let Some(cmdline) = &self.payload.cmdline {
            let max = CMDLINE_MAX_SIZE - 1;
            if cmdline.len() > max {
                return Err(ConfigError::CmdlineTooLong {
                    len: cmdline.len(),
                    max,
                });
            }
        }
        self.serial.check("serial")?;
        self.console.check("console")?;
        self.validate_devices()?;
        if let Some(platform) = &self.platform {
            if platform.num_pci_segments == 0 || platform.num_pci_segments > MAX_NUM_PCI_SEGMENTS {
                return Err(invalid(
                    "platform",
                    format!(
                        "num_pci_segments must be between 1 and {MAX_NUM_PCI_SEGMENTS}; got {}",
                        platform.num_pci_segments
                    ),
                ));
            }
        }
        self.validate_ids()
    }

    fn validate_cpus(&self) -> Result<(), ConfigError> {
        let cpus = &self.cpus;
        if cpus.boot_vcpus == 0 || cpus.boot_vcpus > cpus.max_vcpus || cpus.max_vcpus > MAX_VCPUS {
            return Err(ConfigError::BadVcpuCount {
                boot: cpus.boot_vcpus,
                max: cpus.max_vcpus.min(MAX_VCPUS),
            });
        }
        if let Some(topology) = &cpus.topology {
            if topology.vcpus() != cpus.max_vcpus as u32 {
                return Err(ConfigError::BadTopology {
                    topology: topology.vcpus(),
                    max: cpus.max_vcpus,
                });
            }
        }
        Ok(())
    }

    fn validate_memory(&self) -> Result<(), ConfigError> {
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
        if let Some(balloon) = &self.balloon {
            if balloon.size > self.memory.size {
                return Err(invalid(
                    "balloon",
                    format!(
                        "size {} is larger than the guest's memory ({} bytes)",
                        balloon.size, self.memory.size
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_devices(&self) -> Result<(), ConfigError> {
        for disk in self.disks.iter().flatten() {
            disk.validate()?;
        }
        for net in self.net.iter().flatten() {
            net.validate()?;
        }
        for fs in self.fs.iter().flatten() {
            fs.validate()?;
        }
        for pmem in self.pmem.iter().flatten() {
            pmem.validate()?;
        }
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        Ok(())
    }

    /// Every device id names one device: `vm.remove-device` and hot-plug replies refer to devices by it.
    fn validate_ids(&self) -> Result<(), ConfigError> {
        let mut seen = HashSet::new();
        let ids = self
            .disks
            .iter()
            .flatten()
            .map(|d| &d.id)
            .chain(self.net.iter().flatten().map(|d| &d.id))
            .chain(self.fs.iter().flatten().map(|d| &d.id))
            .chain(self.pmem.iter().flatten().map(|d| &d.id))
            .chain(self.devices.iter().flatten().map(|d| &d.id))
            .chain(self.user_devices.iter().flatten().map(|d| &d.id))
            .chain(self.vdpa.iter().flatten().map(|d| &d.id))
            .chain(self.vsock.iter().map(|d| &d.id))
            .flatten();
        for id in ids {
            if !seen.insert(id.as_str()) {
                return Err(ConfigError::DuplicateId(id.clone()));
            }
        }
        let mut zones = HashSet::new();
        for zone in self.memory.zones.iter().flatten() {
            if !zones.insert(zone.id.as_str()) {
                return Err(invalid(
                    "memory",
                    format!("zone id '{}' is used more than once", zone.id),
                ));
            }
        }
        Ok(())
    }
}

impl DiskConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vhost_user {
            if self.vhost_socket.is_none() {
                return Err(invalid("disk", "vhost_user needs vhost_socket"));
            }
        } else if self.path.is_none() {
            return Err(invalid("disk", "a disk needs a path (or vhost_user)"));
        }
        check_queues("disk", self.num_queues, self.queue_size)
    }
}

impl NetConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vhost_user && self.vhost_socket.is_none() {
            return Err(invalid("net", "vhost_user needs vhost_socket"));
        }
        // One receive and one transmit queue per queue pair.
        if self.num_queues < 2 || !self.num_queues.is_multiple_of(2) {
            return Err(invalid(
                "net",
                format!(
                    "num_queues must be an even number of at least 2; got {}",
                    self.num_queues
                ),
            ));
        }
        check_queues("net", self.num_queues, self.queue_size)
    }
}

impl FsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tag.is_empty() || self.tag.len() > MAX_FS_TAG_LEN {
            return Err(invalid(
                "fs",
                format!(
                    "tag '{}' must be 1 to {MAX_FS_TAG_LEN} bytes long",
                    self.tag
                ),
            ));
        }
        check_queues("fs", self.num_queues, self.queue_size)
    }
}

impl PmemConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.file.as_os_str().is_empty() {
            return Err(invalid("pmem", "file must not be empty"));
        }
        Ok(())
    }
}

impl VsockConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        // CIDs 0-2 are the hypervisor, reserved and host; u32::MAX is VMADDR_CID_ANY.
        if self.cid < 3 || self.cid >= u32::MAX as u64 {
            return Err(invalid(
                "vsock",
                format!("cid {} is reserved: use 3 to {}", self.cid, u32::MAX - 1),
            ));
        }
        if self.socket.as_os_str().is_empty() {
            return Err(invalid("vsock", "socket must not be empty"));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bootable() -> VmConfig {
        VmConfig {
            payload: PayloadConfig {
                kernel: Some("/k".into()),
                ..Default::default()
            },
            memory: MemoryConfig {
                size: 256 << 20,
                ..Default::default()
            },
            ..Default::default()
        }
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
        c.cpus.boot_vcpus = 1;
        c.payload.cmdline = Some("x".repeat(CMDLINE_MAX_SIZE));
        assert!(matches!(
            c.validate(),
            Err(ConfigError::CmdlineTooLong { .. })
        ));
    }

    #[test]
    fn topology_must_match_max_vcpus() {
        let mut c = bootable();
        c.cpus.max_vcpus = 4;
        c.cpus.topology = Some(CpuTopology {
            threads_per_core: 1,
            cores_per_die: 2,
            dies_per_package: 1,
            packages: 1,
        });
        assert_eq!(
            c.validate(),
            Err(ConfigError::BadTopology {
                topology: 2,
                max: 4
            })
        );
        c.cpus.topology.as_mut().unwrap().packages = 2;
        c.validate().unwrap();
    }

    #[test]
    fn device_sections_are_checked() {
        let check = |edit: &dyn Fn(&mut VmConfig)| {
            let mut c = bootable();
            edit(&mut c);
            c.validate()
        };
        assert!(check(&|c| c.vsock = Some(VsockConfig::new(2, "/s"))).is_err());
        check(&|c| c.vsock = Some(VsockConfig::new(3, "/s"))).unwrap();
        assert!(check(&|c| c.disks = Some(vec![DiskConfig::default()])).is_err());
        let disk = |queue_size| DiskConfig {
            path: Some("/d".into()),
            queue_size,
            ..Default::default()
        };
        check(&|c| c.disks = Some(vec![disk(128)])).unwrap();
        assert!(check(&|c| c.disks = Some(vec![disk(100)])).is_err());
        let fs = |tag: &str| FsConfig {
            tag: tag.into(),
            socket: "/s".into(),
            ..Default::default()
        };
        check(&|c| c.fs = Some(vec![fs("myfs")])).unwrap();
        assert!(check(&|c| c.fs = Some(vec![fs("")])).is_err());
        assert!(check(&|c| c.fs = Some(vec![fs(&"t".repeat(37))])).is_err());
        let mut net = NetConfig::default();
        check(&|c| c.net = Some(vec![net.clone()])).unwrap();
        net.num_queues = 3;
        assert!(check(&|c| c.net = Some(vec![net.clone()])).is_err());
        assert!(check(&|c| c.serial = ConsoleConfig::with_mode(ConsoleMode::File)).is_err());
        assert!(check(&|c| c.balloon = Some(BalloonConfig::new(1 << 40))).is_err());
        assert!(check(&|c| {
            c.platform = Some(PlatformConfig {
                num_pci_segments: 0,
                ..Default::default()
            })
        })
        .is_err());
    }

    #[test]
    fn device_ids_are_unique() {
        let mut c = bootable();
        c.disks = Some(vec![DiskConfig {
            path: Some("/d".into()),
            id: Some("dev0".into()),
            ..Default::default()
        }]);
        c.pmem = Some(vec![PmemConfig {
            file: "/p".into(),
            id: Some("dev0".into()),
            ..Default::default()
        }]);
        assert_eq!(c.validate(), Err(ConfigError::DuplicateId("dev0".into())));
        c.pmem.as_mut().unwrap()[0].id = Some("dev1".into());
        c.validate().unwrap();
    }

    #[test]
    fn json_shape_is_cloud_hypervisor_compatible() {
        let json = r#"{"payload":{"kernel":"/k","cmdline":"console=ttyS0"},
            "cpus":{"boot_vcpus":2,"max_vcpus":2},"memory":{"size":268435456},
            "serial":{"mode":"Tty"},"console":{"mode":"Off"}}"#;
        let c: VmConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.cpus.boot_vcpus, 2);
        assert_eq!(c.serial.mode, ConsoleMode::Tty);
        assert!(c.memory.thp);
        assert_eq!(c.rng.src, PathBuf::from("/dev/urandom"));
        assert!(serde_json::from_str::<VmConfig>(r#"{"cpus":{"boot_vcpus":"x"}}"#).is_err());
        assert!(serde_json::from_str::<VmConfig>(r#"{"serial":{"mode":"Loud"}}"#).is_err());
    }

    #[test]
    fn kata_style_create_body_parses() {
        // The shape Kata's clh driver sends: pmem image, hybrid vsock, virtio-fs, rng, consoles, platform.
        let json = r#"{
            "payload": {"kernel": "/opt/kata/vmlinux", "cmdline": "console=hvc0 quiet"},
            "cpus": {"boot_vcpus": 1, "max_vcpus": 4, "max_phys_bits": 46},
            "memory": {"size": 2147483648, "shared": true, "hugepages": false, "hotplug_size": 1073741824},
            "pmem": [{"file": "/opt/kata/kata.img", "discard_writes": true}],
            "vsock": {"cid": 3, "socket": "/run/vc/vm/x/clh.sock"},
            "fs": [{"tag": "kataShared", "socket": "/run/vc/vm/x/vhost-fs.sock", "num_queues": 1,
                    "queue_size": 1024}],
            "rng": {"src": "/dev/urandom"},
            "serial": {"mode": "Off"}, "console": {"mode": "Off"},
            "platform": {"num_pci_segments": 1}
        }"#;
        let c: VmConfig = serde_json::from_str(json).unwrap();
        assert!(c.memory.shared);
        assert_eq!(c.memory.hotplug_size, Some(1 << 30));
        assert!(c.pmem.as_ref().unwrap()[0].discard_writes);
        assert_eq!(c.vsock.as_ref().unwrap().cid, 3);
        assert_eq!(c.fs.as_ref().unwrap()[0].tag, "kataShared");
        assert_eq!(c.platform.as_ref().unwrap().num_pci_segments, 1);
    }

    #[test]
    fn round_trip_keeps_everything() {
        let mut c = bootable();
        c.disks = Some(vec![DiskConfig {
            path: Some("/d".into()),
            readonly: true,
            ..Default::default()
        }]);
        c.net = Some(vec![NetConfig {
            tap: Some("tap0".into()),
            mac: Some("12:34:56:78:9a:bc".parse().unwrap()),
            ..Default::default()
        }]);
        c.memory.zones = Some(vec![MemoryZoneConfig {
            id: "z0".into(),
            size: 1 << 30,
            file: None,
            shared: true,
            hugepages: false,
            hugepage_size: None,
            host_numa_node: None,
            hotplug_size: None,
            hotplugged_size: None,
            prefault: false,
        }]);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&json).unwrap(), c);
    }
}
