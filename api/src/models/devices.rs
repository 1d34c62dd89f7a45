//! Device sections of `VmConfig`, also the bodies of the `vm.add-*` requests.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::vm_config::default_true;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucket {
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds.
    pub refill_time: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiterConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

pub const DEFAULT_DISK_NUM_QUEUES: usize = 1;
pub const DEFAULT_DISK_QUEUE_SIZE: u16 = 128;

fn default_disk_num_queues() -> usize {
    DEFAULT_DISK_NUM_QUEUES
}

fn default_disk_queue_size() -> u16 {
    DEFAULT_DISK_QUEUE_SIZE
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub direct: bool,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default = "default_disk_num_queues")]
    pub num_queues: usize,
    #[serde(default = "default_disk_queue_size")]
    pub queue_size: u16,
    #[serde(default)]
    pub vhost_user: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_group: Option<String>,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            path: None,
            readonly: false,
            direct: false,
            iommu: false,
            num_queues: DEFAULT_DISK_NUM_QUEUES,
            queue_size: DEFAULT_DISK_QUEUE_SIZE,
            vhost_user: false,
            vhost_socket: None,
            rate_limiter_config: None,
            rate_limit_group: None,
            pci_segment: 0,
            id: None,
            serial: None,
        }
    }
}

/// A MAC address, written `12:34:56:78:9a:bc` in JSON as in Cloud Hypervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{0}' is not a MAC address (expected six hex pairs separated by ':')")]
pub struct MacAddrError(String);

impl FromStr for MacAddr {
    type Err = MacAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacAddrError(s.to_string());
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in bytes.iter_mut() {
            let part = parts.next().ok_or_else(err)?;
            // from_str_radix alone would accept "+f" or a single digit.
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum VhostMode {
    #[default]
    Client,
    Server,
}

pub const DEFAULT_NET_NUM_QUEUES: usize = 2;
pub const DEFAULT_NET_QUEUE_SIZE: u16 = 256;

fn default_net_num_queues() -> usize {
    DEFAULT_NET_NUM_QUEUES
}

fn default_net_queue_size() -> u16 {
    DEFAULT_NET_QUEUE_SIZE
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<IpAddr>,
    /// Guest MAC; the VMM picks a locally administered one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_mac: Option<MacAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default = "default_net_num_queues")]
    pub num_queues: usize,
    #[serde(default = "default_net_queue_size")]
    pub queue_size: u16,
    #[serde(default)]
    pub vhost_user: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<String>,
    #[serde(default)]
    pub vhost_mode: VhostMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Tap fds. Only meaningful inside the VMM process: the router clears any numbers a client wrote in the
    /// body (they name the client's fds, not ours); fds travel by SCM_RIGHTS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fds: Option<Vec<i32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<RateLimiterConfig>,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default = "default_true")]
    pub offload_tso: bool,
    #[serde(default = "default_true")]
    pub offload_ufo: bool,
    #[serde(default = "default_true")]
    pub offload_csum: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            tap: None,
            ip: None,
            mask: None,
            mac: None,
            host_mac: None,
            mtu: None,
            iommu: false,
            num_queues: DEFAULT_NET_NUM_QUEUES,
            queue_size: DEFAULT_NET_QUEUE_SIZE,
            vhost_user: false,
            vhost_socket: None,
            vhost_mode: VhostMode::Client,
            id: None,
            fds: None,
            rate_limiter_config: None,
            pci_segment: 0,
            offload_tso: true,
            offload_ufo: true,
            offload_csum: true,
        }
    }
}

pub const DEFAULT_RNG_SOURCE: &str = "/dev/urandom";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngConfig {
    pub src: PathBuf,
    #[serde(default)]
    pub iommu: bool,
}

impl Default for RngConfig {
    fn default() -> Self {
        RngConfig {
            src: PathBuf::from(DEFAULT_RNG_SOURCE),
            iommu: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonConfig {
    /// Bytes.
    pub size: u64,
    #[serde(default)]
    pub deflate_on_oom: bool,
    #[serde(default)]
    pub free_page_reporting: bool,
}

impl BalloonConfig {
    pub fn new(size: u64) -> Self {
        BalloonConfig {
            size,
            deflate_on_oom: false,
            free_page_reporting: false,
        }
    }
}

pub const DEFAULT_FS_NUM_QUEUES: usize = 1;
pub const DEFAULT_FS_QUEUE_SIZE: u16 = 1024;

fn default_fs_num_queues() -> usize {
    DEFAULT_FS_NUM_QUEUES
}

fn default_fs_queue_size() -> u16 {
    DEFAULT_FS_QUEUE_SIZE
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsConfig {
    pub tag: String,
    pub socket: PathBuf,
    #[serde(default = "default_fs_num_queues")]
    pub num_queues: usize,
    #[serde(default = "default_fs_queue_size")]
    pub queue_size: u16,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            tag: String::new(),
            socket: PathBuf::new(),
            num_queues: DEFAULT_FS_NUM_QUEUES,
            queue_size: DEFAULT_FS_QUEUE_SIZE,
            pci_segment: 0,
            id: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmemConfig {
    pub file: PathBuf,
    /// Bytes; the file's size when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub discard_writes: bool,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// A VFIO device (`vm.add-device`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// A vfio-user device (`vm.add-user-device`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserDeviceConfig {
    pub socket: PathBuf,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

fn default_vdpa_num_queues() -> usize {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdpaConfig {
    pub path: PathBuf,
    #[serde(default = "default_vdpa_num_queues")]
    pub num_queues: usize,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Hybrid vsock: the host side is a Unix socket; host-initiated connections write `CONNECT <port>\n`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    pub cid: u64,
    pub socket: PathBuf,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl VsockConfig {
    pub fn new(cid: u64, socket: impl Into<PathBuf>) -> Self {
        VsockConfig {
            cid,
            socket: socket.into(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses() {
        let mac: MacAddr = "12:34:56:78:9A:bc".parse().unwrap();
        assert_eq!(mac.0, [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);
        assert_eq!(mac.to_string(), "12:34:56:78:9a:bc");
        for bad in [
            "",
            "12:34:56:78:9a",
            "12:34:56:78:9a:bc:de",
            "12:34:56:78:9a:+c",
            "1:34:56:78:9a:bc",
            "12-34-56-78-9a-bc",
            "12:34:56:78:9a:bg",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<NetConfig>(r#"{"mac":"zz"}"#).is_err());
    }

    #[test]
    fn defaults_match_cloud_hypervisor() {
        let disk: DiskConfig = serde_json::from_str(r#"{"path":"/d"}"#).unwrap();
        assert_eq!((disk.num_queues, disk.queue_size), (1, 128));
        let net: NetConfig = serde_json::from_str(r#"{"tap":"tap0"}"#).unwrap();
        assert_eq!((net.num_queues, net.queue_size), (2, 256));
        assert!(net.offload_tso && net.offload_ufo && net.offload_csum);
        let fs: FsConfig = serde_json::from_str(r#"{"tag":"t","socket":"/s"}"#).unwrap();
        assert_eq!((fs.num_queues, fs.queue_size), (1, 1024));
        let net: NetConfig =
            serde_json::from_str(r#"{"ip":"192.168.249.1","mask":"255.255.255.0"}"#).unwrap();
        assert_eq!(net.ip, Some("192.168.249.1".parse().unwrap()));
        assert!(serde_json::from_str::<NetConfig>(r#"{"ip":"300.1.1.1"}"#).is_err());
        assert!(serde_json::from_str::<FsConfig>(r#"{"tag":"t"}"#).is_err());
    }
}
