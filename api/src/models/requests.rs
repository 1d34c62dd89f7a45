//! Bodies of the action requests and of the replies.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::vm_config::VmConfig;

/// `vm.resize`: any subset of the three targets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmResize {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_vcpus: Option<u8>,
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_ram: Option<u64>,
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_balloon: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmResizeZone {
    pub id: String,
    /// Bytes.
    pub desired_ram: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmResizeDisk {
    pub id: String,
    /// Bytes.
    pub desired_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRemoveDevice {
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSnapshotConfig {
    /// `file:///dir`.
    pub destination_url: String,
}

/// How a restore brings back guest memory. Cloud Hypervisor's `Copy` and `OnDemand` keep their meaning;
/// trenv's default is copy-on-write mapping of the template's images, which shares clean pages between
/// every instance. The lowercase spellings of trenv's docs are accepted too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryRestoreMode {
    /// Read the whole memory file back before resuming.
    #[serde(alias = "copy")]
    Copy,
    /// Fault pages in on first touch (userfaultfd).
    #[serde(alias = "ondemand", alias = "on_demand")]
    OnDemand,
    /// Map the memory file privately: pages are shared until written.
    #[default]
    #[serde(alias = "cow", alias = "Cow")]
    CopyOnWrite,
}

/// Which of the fds passed with `vm.restore` belong to which restored NIC, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoredNetConfig {
    pub id: String,
    #[serde(default)]
    pub num_fds: usize,
    /// Filled in by the VMM; numbers a client writes here are cleared by the router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fds: Option<Vec<i32>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreConfig {
    /// `file:///dir`.
    pub source_url: String,
    #[serde(default)]
    pub prefault: bool,
    #[serde(default)]
    pub memory_restore_mode: MemoryRestoreMode,
    /// Cloud Hypervisor leaves a restored VM paused unless this is set.
    #[serde(default)]
    pub resume: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_fds: Option<Vec<RestoredNetConfig>>,
}

impl RestoreConfig {
    pub fn new(source_url: impl Into<String>) -> Self {
        RestoreConfig {
            source_url: source_url.into(),
            prefault: false,
            memory_restore_mode: MemoryRestoreMode::CopyOnWrite,
            resume: false,
            net_fds: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendMigrationData {
    pub destination_url: String,
    /// Same-host migration: memory travels as fds instead of bytes.
    #[serde(default)]
    pub local: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiveMigrationData {
    pub receiver_url: String,
}

/// The VM's lifecycle state, spelled as `vm.info` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmState {
    Created,
    Running,
    Shutdown,
    Paused,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            VmState::Created => "Created",
            VmState::Running => "Running",
            VmState::Shutdown => "Shutdown",
            VmState::Paused => "Paused",
        };
        f.write_str(name)
    }
}

/// One node of `vm.info`'s device tree.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceNode {
    pub id: String,
    /// Cloud Hypervisor serializes a Rust enum per resource here (e.g. `{"MmioAddressRange": {..}}`).
    #[serde(default)]
    pub resources: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default)]
    pub children: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_bdf: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub config: VmConfig,
    pub state: VmState,
    /// Bytes of guest RAM currently plugged in (less the balloon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_actual_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_tree: Option<BTreeMap<String, DeviceNode>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPingResponse {
    #[serde(default)]
    pub build_version: String,
    pub version: String,
    #[serde(default)]
    pub pid: i64,
    #[serde(default)]
    pub features: Vec<String>,
}

/// The reply to a hot-plug: the device's id and PCI address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceInfo {
    pub id: String,
    /// `segment:bus:device.function`, e.g. `0000:00:05.0`.
    pub bdf: String,
}

impl PciDeviceInfo {
    pub fn new(id: impl Into<String>, segment: u16, bus: u8, device: u8, function: u8) -> Self {
        PciDeviceInfo {
            id: id.into(),
            bdf: format!("{segment:04x}:{bus:02x}:{device:02x}.{function:x}"),
        }
    }
}

/// `vm.counters`: device id -> counter name -> value.
pub type VmCounters = BTreeMap<String, BTreeMap<String, u64>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdf_format() {
        assert_eq!(PciDeviceInfo::new("_disk2", 0, 0, 5, 0).bdf, "0000:00:05.0");
        assert_eq!(
            PciDeviceInfo::new("x", 0x10, 0xab, 0x1f, 7).bdf,
            "0010:ab:1f.7"
        );
    }

    #[test]
    fn restore_defaults() {
        let r: RestoreConfig = serde_json::from_str(r#"{"source_url":"file:///s"}"#).unwrap();
        assert_eq!(r, RestoreConfig::new("file:///s"));
        let r: RestoreConfig = serde_json::from_str(
            r#"{"source_url":"file:///s","memory_restore_mode":"OnDemand","resume":true,
                "net_fds":[{"id":"net0","num_fds":2}]}"#,
        )
        .unwrap();
        assert_eq!(r.memory_restore_mode, MemoryRestoreMode::OnDemand);
        assert!(r.resume);
        assert_eq!(r.net_fds.unwrap()[0].num_fds, 2);
        assert!(serde_json::from_str::<RestoreConfig>(r#"{"resume":true}"#).is_err());
    }

    #[test]
    fn vm_info_shape() {
        let info = VmInfo {
            config: VmConfig::default(),
            state: VmState::Running,
            memory_actual_size: Some(1 << 29),
            device_tree: None,
        };
        let v = serde_json::to_value(&info).unwrap();
        assert_eq!(v["state"], "Running");
        assert_eq!(v["memory_actual_size"], 1 << 29);
        assert_eq!(v["config"]["memory"]["size"], 512u64 << 20);
        assert_eq!(VmState::Paused.to_string(), "Paused");
    }
}

/// `PUT vm.repurpose` (a trenv extension): switch the running VM in place to another template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRepurposeConfig {
    /// A template: `file:///dir`, an absolute directory, or a name (or digest) in the VMM's template store.
    pub template: String,
    /// Run the new tenant at once; otherwise the VM is left paused.
    #[serde(default)]
    pub resume: bool,
    /// `CopyOnWrite` (default) or `Copy`; `OnDemand` cannot be set up in place.
    #[serde(default)]
    pub memory_restore_mode: MemoryRestoreMode,
}
