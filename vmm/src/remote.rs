//! `trenv-remote`: a `ch-remote`-compatible client for the VMM's HTTP API.
//!
//! `trenv-remote --api-socket S <command> [args]` sends one request the way `ch-remote` does and prints the
//! JSON answer pretty-printed on stdout; a failed request prints the server's error chain on stderr and
//! exits non-zero. Device arguments use the CLI syntax `k=v,k=v` (values with commas in `[...]`), converted
//! to the JSON body Cloud Hypervisor's API takes: `on`/`off` become booleans, sizes like `1G` become bytes
//! where Cloud Hypervisor's parser does that, numbers become numbers, unknown keys are refused. File
//! descriptors named by `add-net fd=[3,4]` and `restore net_fds=[net0@[3,4]]` travel with the request by
//! SCM_RIGHTS and are left out of the body, as `ch-remote` does.

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{json, Map, Value};

use crate::config::parse_size;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RemoteError {
    #[error("invalid {what} '{spec}': {reason}")]
    Syntax {
        what: &'static str,
        spec: String,
        reason: String,
    },
    #[error("unknown parameter '{key}' in {what} (known: {known})")]
    UnknownKey {
        what: &'static str,
        key: String,
        known: String,
    },
    #[error("{what} needs {key}=")]
    MissingKey {
        what: &'static str,
        key: &'static str,
    },
    #[error("{what}: {value}")]
    BadValue { what: &'static str, value: String },
    #[error("file descriptor {0} is not open in this process")]
    BadFd(RawFd),
    #[error("cannot read the VM config {path}: {reason}")]
    ReadConfig { path: String, reason: String },
    #[error("the VM config {path} is not valid JSON: {reason}")]
    ConfigJson { path: String, reason: String },
    #[error("resize needs at least one of --cpus, --memory, --balloon")]
    EmptyResize,
}

/// The device kinds `ch-remote add-*` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Disk,
    Net,
    Fs,
    Pmem,
    Vsock,
    Device,
    UserDevice,
    Vdpa,
}

impl DeviceKind {
    /// The API endpoint that adds this kind of device.
    pub fn endpoint(self) -> &'static str {
        match self {
            DeviceKind::Disk => "vm.add-disk",
            DeviceKind::Net => "vm.add-net",
            DeviceKind::Fs => "vm.add-fs",
            DeviceKind::Pmem => "vm.add-pmem",
            DeviceKind::Vsock => "vm.add-vsock",
            DeviceKind::Device => "vm.add-device",
            DeviceKind::UserDevice => "vm.add-user-device",
            DeviceKind::Vdpa => "vm.add-vdpa",
        }
    }

    fn what(self) -> &'static str {
        match self {
            DeviceKind::Disk => "disk",
            DeviceKind::Net => "network",
            DeviceKind::Fs => "virtio-fs",
            DeviceKind::Pmem => "persistent memory",
            DeviceKind::Vsock => "vsock",
            DeviceKind::Device => "device",
            DeviceKind::UserDevice => "user device",
            DeviceKind::Vdpa => "vDPA",
        }
    }

    fn keys(self) -> &'static [Key] {
        match self {
            DeviceKind::Disk => DISK_KEYS,
            DeviceKind::Net => NET_KEYS,
            DeviceKind::Fs => FS_KEYS,
            DeviceKind::Pmem => PMEM_KEYS,
            DeviceKind::Vsock => VSOCK_KEYS,
            DeviceKind::Device => DEVICE_KEYS,
            DeviceKind::UserDevice => USER_DEVICE_KEYS,
            DeviceKind::Vdpa => VDPA_KEYS,
        }
    }
}

/// How one CLI value becomes JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conv {
    Str,
    Bool,
    Num,
    /// Bytes, with an optional K/M/G suffix (Cloud Hypervisor's `ByteSized`).
    Size,
    /// `client|server` -> "Client"/"Server".
    VhostMode,
    /// `copy|ondemand` -> "Copy"/"OnDemand".
    RestoreMode,
    /// `[3,4]`: descriptors that go by SCM_RIGHTS, not in the body.
    Fds,
    /// `[net0@[3,4],net1@[5,6]]`: restored NICs and their new descriptors.
    NetFds,
    /// `[0@[0,1],1@[2-3]]` -> `[{queue_index, host_cpus}]`.
    QueueAffinity,
    /// `bw_*` / `ops_*`: parts of `rate_limiter_config`.
    RateLimit,
}

#[derive(Debug, Clone, Copy)]
struct Key {
    cli: &'static str,
    json: &'static str,
    conv: Conv,
    required: bool,
}

const fn key(cli: &'static str, conv: Conv) -> Key {
    Key {
        cli,
        json: cli,
        conv,
        required: false,
    }
}

const fn renamed(cli: &'static str, json: &'static str, conv: Conv) -> Key {
    Key {
        cli,
        json,
        conv,
        required: false,
    }
}

const fn required(cli: &'static str, conv: Conv) -> Key {
    Key {
        cli,
        json: cli,
        conv,
        required: true,
    }
}

const RATE_LIMIT_KEYS: [Key; 6] = [
    key("bw_size", Conv::RateLimit),
    key("bw_one_time_burst", Conv::RateLimit),
    key("bw_refill_time", Conv::RateLimit),
    key("ops_size", Conv::RateLimit),
    key("ops_one_time_burst", Conv::RateLimit),
    key("ops_refill_time", Conv::RateLimit),
];

const DISK_KEYS: &[Key] = &[
    key("path", Conv::Str),
    key("readonly", Conv::Bool),
    key("direct", Conv::Bool),
    key("iommu", Conv::Bool),
    key("num_queues", Conv::Num),
    key("queue_size", Conv::Num),
    key("vhost_user", Conv::Bool),
    renamed("socket", "vhost_socket", Conv::Str),
    RATE_LIMIT_KEYS[0],
    RATE_LIMIT_KEYS[1],
    RATE_LIMIT_KEYS[2],
    RATE_LIMIT_KEYS[3],
    RATE_LIMIT_KEYS[4],
    RATE_LIMIT_KEYS[5],
    key("id", Conv::Str),
    renamed("_disable_io_uring", "disable_io_uring", Conv::Bool),
    renamed("_disable_aio", "disable_aio", Conv::Bool),
    key("pci_segment", Conv::Num),
    key("serial", Conv::Str),
    key("rate_limit_group", Conv::Str),
    key("queue_affinity", Conv::QueueAffinity),
];

const NET_KEYS: &[Key] = &[
    key("tap", Conv::Str),
    key("ip", Conv::Str),
    key("mask", Conv::Str),
    key("mac", Conv::Str),
    key("host_mac", Conv::Str),
    key("offload_tso", Conv::Bool),
    key("offload_ufo", Conv::Bool),
    key("offload_csum", Conv::Bool),
    key("mtu", Conv::Num),
    key("iommu", Conv::Bool),
    key("queue_size", Conv::Num),
    key("num_queues", Conv::Num),
    key("vhost_user", Conv::Bool),
    renamed("socket", "vhost_socket", Conv::Str),
    key("vhost_mode", Conv::VhostMode),
    key("id", Conv::Str),
    renamed("fd", "fds", Conv::Fds),
    RATE_LIMIT_KEYS[0],
    RATE_LIMIT_KEYS[1],
    RATE_LIMIT_KEYS[2],
    RATE_LIMIT_KEYS[3],
    RATE_LIMIT_KEYS[4],
    RATE_LIMIT_KEYS[5],
    key("pci_segment", Conv::Num),
];

const FS_KEYS: &[Key] = &[
    required("tag", Conv::Str),
    required("socket", Conv::Str),
    key("num_queues", Conv::Num),
    key("queue_size", Conv::Num),
    key("id", Conv::Str),
    key("pci_segment", Conv::Num),
];

const PMEM_KEYS: &[Key] = &[
    required("file", Conv::Str),
    key("size", Conv::Size),
    key("iommu", Conv::Bool),
    key("discard_writes", Conv::Bool),
    key("id", Conv::Str),
    key("pci_segment", Conv::Num),
];

const VSOCK_KEYS: &[Key] = &[
    required("cid", Conv::Num),
    required("socket", Conv::Str),
    key("iommu", Conv::Bool),
    key("id", Conv::Str),
    key("pci_segment", Conv::Num),
];

const DEVICE_KEYS: &[Key] = &[
    required("path", Conv::Str),
    key("iommu", Conv::Bool),
    key("id", Conv::Str),
    key("pci_segment", Conv::Num),
    key("x_nv_gpudirect_clique", Conv::Num),
];

const USER_DEVICE_KEYS: &[Key] = &[
    required("socket", Conv::Str),
    key("id", Conv::Str),
    key("pci_segment", Conv::Num),
];

const VDPA_KEYS: &[Key] = &[
    required("path", Conv::Str),
    key("num_queues", Conv::Num),
    key("iommu", Conv::Bool),
    key("id", Conv::Str),
    key("pci_segment", Conv::Num),
];

const RESTORE_KEYS: &[Key] = &[
    required("source_url", Conv::Str),
    key("prefault", Conv::Bool),
    key("net_fds", Conv::NetFds),
    key("memory_restore_mode", Conv::RestoreMode),
    key("resume", Conv::Bool),
];

/// A request body built from CLI syntax, plus the descriptors that go with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub body: Value,
    pub fds: Vec<RawFd>,
}

/// Splits `k=v,k=v` at commas outside `[...]` and quotes, as Cloud Hypervisor's option parser does.
fn split_top_level(spec: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in spec.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '[' if !quoted => depth += 1,
            ']' if !quoted => {
                depth -= 1;
                if depth < 0 {
                    return Err("unbalanced ']'".into());
                }
            }
            ',' if !quoted && depth == 0 => {
                parts.push(&spec[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced '['".into());
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    parts.push(&spec[start..]);
    Ok(parts.into_iter().filter(|p| !p.trim().is_empty()).collect())
}

/// The inside of `[...]`, or the value itself when it has no brackets.
fn unbracket(value: &str) -> &str {
    value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(value)
}

fn parse_u64(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// `[1,3-5]` -> [1, 3, 4, 5]: Cloud Hypervisor's integer list syntax.
fn parse_int_list(value: &str) -> Result<Vec<u64>, String> {
    let mut out = Vec::new();
    for item in unbracket(value).split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        if let Some((lo, hi)) = item.split_once('-') {
            let (Some(lo), Some(hi)) = (parse_u64(lo), parse_u64(hi)) else {
                return Err(format!("'{item}' is not a range like 2-5"));
            };
            if lo > hi || hi - lo > 4096 {
                return Err(format!("'{item}' is not a sensible range"));
            }
            out.extend(lo..=hi);
        } else {
            out.push(parse_u64(item).ok_or_else(|| format!("'{item}' is not a number"))?);
        }
    }
    Ok(out)
}

/// `[a@[1,2],b@[3]]` -> [("a", [1, 2]), ("b", [3])].
fn parse_tuple_list(value: &str) -> Result<Vec<(String, Vec<u64>)>, String> {
    let inner = unbracket(value);
    let mut out = Vec::new();
    for item in split_top_level(inner)? {
        let (name, list) = item
            .split_once('@')
            .ok_or_else(|| format!("'{item}' is not NAME@[LIST]"))?;
        if name.trim().is_empty() {
            return Err(format!("'{item}' has an empty name"));
        }
        out.push((name.trim().to_string(), parse_int_list(list)?));
    }
    Ok(out)
}

fn to_fd(n: u64) -> Result<RawFd, String> {
    RawFd::try_from(n).map_err(|_| format!("{n} is not a file descriptor number"))
}

/// Converts `spec` under `keys` into a JSON object; descriptors are collected apart.
fn convert(what: &'static str, spec: &str, keys: &[Key]) -> Result<Request, RemoteError> {
    let syntax = |reason: String| RemoteError::Syntax {
        what,
        spec: spec.to_string(),
        reason,
    };
    let mut body = Map::new();
    let mut fds = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    let mut rate: Map<String, Value> = Map::new();
    for item in split_top_level(spec).map_err(syntax)? {
        let (k, raw) = item.split_once('=').unwrap_or((item, ""));
        let k = k.trim();
        let Some(key) = keys.iter().find(|key| key.cli == k) else {
            return Err(RemoteError::UnknownKey {
                what,
                key: k.to_string(),
                known: keys.iter().map(|k| k.cli).collect::<Vec<_>>().join(", "),
            });
        };
        if seen.contains(&key.cli) {
            return Err(syntax(format!("'{k}' given twice")));
        }
        seen.push(key.cli);
        let value = raw.trim().trim_matches('"');
        let bad = |expected: &str| RemoteError::BadValue {
            what,
            value: format!("{k}={raw}: expected {expected}"),
        };
        if value.is_empty() && key.conv != Conv::Bool {
            return Err(bad("a value"));
        }
        let json_value = match key.conv {
            Conv::Str => Value::from(value),
            Conv::Bool => match value {
                "" | "on" | "true" => Value::Bool(true),
                "off" | "false" => Value::Bool(false),
                _ => return Err(bad("on or off")),
            },
            Conv::Num => Value::from(parse_u64(value).ok_or_else(|| bad("a number"))?),
            Conv::Size => Value::from(parse_size(value).ok_or_else(|| bad("a size like 128M"))?),
            Conv::VhostMode => match value.to_ascii_lowercase().as_str() {
                "client" => Value::from("Client"),
                "server" => Value::from("Server"),
                _ => return Err(bad("client or server")),
            },
            Conv::RestoreMode => match value.to_ascii_lowercase().as_str() {
                "copy" => Value::from("Copy"),
                "ondemand" => Value::from("OnDemand"),
                _ => return Err(bad("copy or ondemand")),
            },
            Conv::Fds => {
                let list = parse_int_list(value).map_err(|e| bad(&e))?;
                for n in list {
                    fds.push(to_fd(n).map_err(|e| bad(&e))?);
                }
                continue;
            }
            Conv::NetFds => {
                let mut nets = Vec::new();
                for (id, list) in parse_tuple_list(value).map_err(|e| bad(&e))? {
                    nets.push(json!({"id": id, "num_fds": list.len()}));
                    for n in list {
                        fds.push(to_fd(n).map_err(|e| bad(&e))?);
                    }
                }
                Value::Array(nets)
            }
            Conv::QueueAffinity => {
                let mut queues = Vec::new();
                for (index, cpus) in parse_tuple_list(value).map_err(|e| bad(&e))? {
                    let index: u16 = index
                        .parse()
                        .map_err(|_| bad("queue indices like [0@[0,1],1@[2]]"))?;
                    queues.push(json!({"queue_index": index, "host_cpus": cpus}));
                }
                Value::Array(queues)
            }
            Conv::RateLimit => {
                rate.insert(
                    key.cli.to_string(),
                    Value::from(parse_u64(value).ok_or_else(|| bad("a number"))?),
                );
                continue;
            }
        };
        body.insert(key.json.to_string(), json_value);
    }
    for key in keys.iter().filter(|k| k.required) {
        if !seen.contains(&key.cli) {
            return Err(RemoteError::MissingKey { what, key: key.cli });
        }
    }
    if let Some(limiter) = rate_limiter(&rate) {
        body.insert("rate_limiter_config".into(), limiter);
    }
    Ok(Request {
        body: Value::Object(body),
        fds,
    })
}

/// Cloud Hypervisor's rule: a token bucket exists when both its size and its refill time are non-zero.
fn rate_limiter(rate: &Map<String, Value>) -> Option<Value> {
    let get = |k: &str| rate.get(k).and_then(Value::as_u64).unwrap_or(0);
    let bucket = |prefix: &str| {
        let size = get(&format!("{prefix}_size"));
        let refill_time = get(&format!("{prefix}_refill_time"));
        (size != 0 && refill_time != 0).then(|| {
            json!({
                "size": size,
                "one_time_burst": get(&format!("{prefix}_one_time_burst")),
                "refill_time": refill_time,
            })
        })
    };
    let mut limiter = Map::new();
    if let Some(b) = bucket("bw") {
        limiter.insert("bandwidth".into(), b);
    }
    if let Some(b) = bucket("ops") {
        limiter.insert("ops".into(), b);
    }
    (!limiter.is_empty()).then_some(Value::Object(limiter))
}

/// Converts an `add-*` argument (`path=/x,readonly=on`) into the endpoint's JSON body.
pub fn device_request(kind: DeviceKind, spec: &str) -> Result<Request, RemoteError> {
    convert(kind.what(), spec, kind.keys())
}

/// Converts a `restore` argument (`source_url=file:///x,prefault=on`) into `vm.restore`'s body.
pub fn restore_request(spec: &str) -> Result<Request, RemoteError> {
    convert("restore", spec, RESTORE_KEYS)
}

fn size_arg(what: &'static str, text: &str) -> Result<u64, RemoteError> {
    parse_size(text).ok_or_else(|| RemoteError::BadValue {
        what,
        value: format!("'{text}' is not a size like 512M or 2G"),
    })
}

/// `resize --cpus N --memory SIZE --balloon SIZE` -> `{desired_vcpus, desired_ram, desired_balloon}`.
pub fn resize_body(
    cpus: Option<&str>,
    memory: Option<&str>,
    balloon: Option<&str>,
) -> Result<Value, RemoteError> {
    if cpus.is_none() && memory.is_none() && balloon.is_none() {
        return Err(RemoteError::EmptyResize);
    }
    let mut body = Map::new();
    if let Some(cpus) = cpus {
        let n: u8 = cpus.trim().parse().map_err(|_| RemoteError::BadValue {
            what: "CPU count",
            value: format!("'{cpus}' is not a number from 1 to 255"),
        })?;
        body.insert("desired_vcpus".into(), Value::from(n));
    }
    if let Some(memory) = memory {
        body.insert(
            "desired_ram".into(),
            Value::from(size_arg("memory size", memory)?),
        );
    }
    if let Some(balloon) = balloon {
        body.insert(
            "desired_balloon".into(),
            Value::from(size_arg("balloon size", balloon)?),
        );
    }
    Ok(Value::Object(body))
}

/// Reads a `VmConfig` for `create` from a file or, for `-`, stdin, and checks that it is JSON.
pub fn read_vm_config(path: &str) -> Result<String, RemoteError> {
    use std::io::Read;
    let text = if path == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| RemoteError::ReadConfig {
                path: "stdin".into(),
                reason: e.to_string(),
            })?;
        text
    } else {
        std::fs::read_to_string(path).map_err(|e| RemoteError::ReadConfig {
            path: path.into(),
            reason: e.to_string(),
        })?
    };
    let value: Value = serde_json::from_str(&text).map_err(|e| RemoteError::ConfigJson {
        path: path.into(),
        reason: e.to_string(),
    })?;
    // Re-serialised compactly: one request line of JSON, as the server logs it.
    Ok(value.to_string())
}

fn check_fds_open(fds: &[RawFd]) -> Result<(), RemoteError> {
    for &fd in fds {
        // SAFETY: F_GETFD only queries the descriptor table.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(RemoteError::BadFd(fd));
        }
    }
    Ok(())
}

#[derive(Parser, Debug)]
#[command(
    name = "trenv-remote",
    version,
    about = "Remotely control a trenv VMM (ch-remote compatible)"
)]
struct Cli {
    /// HTTP API socket path (UNIX domain socket).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Ping the VMM to check for API server availability
    Ping,
    /// Shut down the VMM
    ShutdownVmm,
    /// Info on the VM
    Info,
    /// Counters from the VM
    Counters,
    /// Create a VM from a JSON configuration file ('-' reads stdin)
    Create {
        #[arg(default_value = "-")]
        path: String,
    },
    /// Boot a created VM
    Boot,
    /// Delete a VM
    Delete,
    /// Shut down the VM
    Shutdown,
    /// Reboot the VM
    Reboot,
    /// Pause the VM
    Pause,
    /// Resume the VM
    Resume,
    /// Trigger a power button in the VM
    PowerButton,
    /// Trigger an NMI
    Nmi,
    /// Resize the VM
    Resize {
        /// New vCPUs count
        #[arg(long)]
        cpus: Option<String>,
        /// New memory size in bytes (supports K/M/G suffix)
        #[arg(long)]
        memory: Option<String>,
        /// New balloon size in bytes (supports K/M/G suffix)
        #[arg(long)]
        balloon: Option<String>,
    },
    /// Resize a memory zone
    ResizeZone {
        /// Memory zone identifier
        #[arg(long)]
        id: String,
        /// New memory zone size in bytes (supports K/M/G suffix)
        #[arg(long)]
        size: String,
    },
    /// Resize a disk
    ResizeDisk {
        /// Disk identifier
        #[arg(long, alias = "id")]
        disk: String,
        /// New disk size in bytes (supports K/M/G suffix)
        #[arg(long)]
        size: String,
    },
    /// Add VFIO device: path=<device_path>,iommu=on|off,id=<device_id>,pci_segment=<segment_id>
    AddDevice { config: String },
    /// Add block device: path=<disk_image_path>,readonly=on|off,direct=on|off,num_queues=..,id=..
    AddDisk { config: String },
    /// Add virtio-fs device: tag=<tag_name>,socket=<socket_path>,num_queues=..,queue_size=..,id=..
    AddFs { config: String },
    /// Add persistent memory device: file=<path>,size=<size>,discard_writes=on|off,id=..
    AddPmem { config: String },
    /// Add network device: tap=<if_name>,ip=..,mask=..,mac=..,fd=[fd1,fd2],num_queues=..,id=..
    AddNet { config: String },
    /// Add vsock device: cid=<context_id>,socket=<socket_path>,id=..
    AddVsock { config: String },
    /// Add userspace device: socket=<socket_path>,id=<device_id>,pci_segment=<segment_id>
    AddUserDevice { config: String },
    /// Add vDPA device: path=<device_path>,num_queues=..,iommu=on|off,id=..
    AddVdpa { config: String },
    /// Remove a device
    RemoveDevice { id: String },
    /// Create a snapshot of the (paused) VM: file:///dir
    Snapshot { destination_url: String },
    /// Restore from a snapshot: source_url=file:///dir[,prefault=on][,memory_restore_mode=copy|ondemand]
    Restore { config: String },
    /// Send a VM to another VMM
    SendMigration {
        destination_url: String,
        /// Local migration (shares memory with the receiver)
        #[arg(long)]
        local: bool,
    },
    /// Receive a VM from another VMM
    ReceiveMigration { receiver_url: String },
}

/// One API call: method, endpoint, body, descriptors.
struct Call {
    method: &'static str,
    endpoint: &'static str,
    body: Option<String>,
    fds: Vec<RawFd>,
}

impl Call {
    fn get(endpoint: &'static str) -> Call {
        Call {
            method: "GET",
            endpoint,
            body: None,
            fds: Vec::new(),
        }
    }

    fn put(endpoint: &'static str, body: Option<String>) -> Call {
        Call {
            method: "PUT",
            endpoint,
            body,
            fds: Vec::new(),
        }
    }

    fn with_request(endpoint: &'static str, request: Request) -> Call {
        Call {
            method: "PUT",
            endpoint,
            body: Some(request.body.to_string()),
            fds: request.fds,
        }
    }
}

fn build_call(command: Command) -> Result<Call, RemoteError> {
    let device = |kind: DeviceKind, config: &str| -> Result<Call, RemoteError> {
        Ok(Call::with_request(
            kind.endpoint(),
            device_request(kind, config)?,
        ))
    };
    Ok(match command {
        Command::Ping => Call::get("vmm.ping"),
        Command::ShutdownVmm => Call::put("vmm.shutdown", None),
        Command::Info => Call::get("vm.info"),
        Command::Counters => Call::get("vm.counters"),
        Command::Create { path } => Call::put("vm.create", Some(read_vm_config(&path)?)),
        Command::Boot => Call::put("vm.boot", None),
        Command::Delete => Call::put("vm.delete", None),
        Command::Shutdown => Call::put("vm.shutdown", None),
        Command::Reboot => Call::put("vm.reboot", None),
        Command::Pause => Call::put("vm.pause", None),
        Command::Resume => Call::put("vm.resume", None),
        Command::PowerButton => Call::put("vm.power-button", None),
        Command::Nmi => Call::put("vm.nmi", None),
        Command::Resize {
            cpus,
            memory,
            balloon,
        } => Call::put(
            "vm.resize",
            Some(resize_body(cpus.as_deref(), memory.as_deref(), balloon.as_deref())?.to_string()),
        ),
        Command::ResizeZone { id, size } => Call::put(
            "vm.resize-zone",
            Some(
                json!({"id": id, "desired_ram": size_arg("memory zone size", &size)?}).to_string(),
            ),
        ),
        Command::ResizeDisk { disk, size } => Call::put(
            "vm.resize-disk",
            Some(json!({"id": disk, "desired_size": size_arg("disk size", &size)?}).to_string()),
        ),
        Command::AddDevice { config } => device(DeviceKind::Device, &config)?,
        Command::AddDisk { config } => device(DeviceKind::Disk, &config)?,
        Command::AddFs { config } => device(DeviceKind::Fs, &config)?,
        Command::AddPmem { config } => device(DeviceKind::Pmem, &config)?,
        Command::AddNet { config } => device(DeviceKind::Net, &config)?,
        Command::AddVsock { config } => device(DeviceKind::Vsock, &config)?,
        Command::AddUserDevice { config } => device(DeviceKind::UserDevice, &config)?,
        Command::AddVdpa { config } => device(DeviceKind::Vdpa, &config)?,
        Command::RemoveDevice { id } => {
            Call::put("vm.remove-device", Some(json!({ "id": id }).to_string()))
        }
        Command::Snapshot { destination_url } => Call::put(
            "vm.snapshot",
            Some(json!({ "destination_url": destination_url }).to_string()),
        ),
        Command::Restore { config } => Call::with_request("vm.restore", restore_request(&config)?),
        Command::SendMigration {
            destination_url,
            local,
        } => Call::put(
            "vm.send-migration",
            Some(json!({"destination_url": destination_url, "local": local}).to_string()),
        ),
        Command::ReceiveMigration { receiver_url } => Call::put(
            "vm.receive-migration",
            Some(json!({ "receiver_url": receiver_url }).to_string()),
        ),
    })
}

/// Formats an API error body (a JSON array of strings, outermost first) as one line.
pub fn error_body_text(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect::<Vec<_>>()
            .join(": "),
        _ => body.trim().to_string(),
    }
}

/// Pretty-prints a JSON body; a body that is not JSON is returned as it came.
pub fn pretty_body(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_else(|_| body.to_string()),
        Err(_) => body.trim_end().to_string(),
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let call = build_call(cli.command).map_err(|e| e.to_string())?;
    check_fds_open(&call.fds).map_err(|e| e.to_string())?;
    let client = api::client::ApiClient::new(&cli.api_socket);
    let (status, body) = client
        .request(call.method, call.endpoint, call.body.as_deref(), &call.fds)
        .map_err(|e| {
            format!(
                "{} {} via {}: {}",
                call.method,
                call.endpoint,
                cli.api_socket.display(),
                crate::error_chain(&e)
            )
        })?;
    if (200..300).contains(&status) {
        if !body.trim().is_empty() {
            println!("{}", pretty_body(&body));
        }
        Ok(())
    } else {
        let detail = error_body_text(&body);
        Err(format!(
            "{} failed (HTTP {status}){}{detail}",
            call.endpoint,
            if detail.is_empty() { "" } else { ": " }
        ))
    }
}

/// `trenv-remote`'s main function; `args` includes the program name.
pub fn main_with_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("trenv-remote: error: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(kind: DeviceKind, spec: &str) -> Value {
        device_request(kind, spec).unwrap().body
    }

    #[test]
    fn disk_from_cloud_hypervisor_examples() {
        // From Cloud Hypervisor's docs: `--disk path=/foo.img,readonly=on,num_queues=4,queue_size=128`.
        assert_eq!(
            body(
                DeviceKind::Disk,
                "path=/foo.img,readonly=on,direct=off,num_queues=4,queue_size=128,id=disk1"
            ),
            json!({"path": "/foo.img", "readonly": true, "direct": false, "num_queues": 4,
                   "queue_size": 128, "id": "disk1"})
        );
        // vhost-user: the CLI's `socket` is the JSON's `vhost_socket`.
        assert_eq!(
            body(
                DeviceKind::Disk,
                "vhost_user=true,socket=/tmp/vhost.sock,serial=abc,pci_segment=1"
            ),
            json!({"vhost_user": true, "vhost_socket": "/tmp/vhost.sock", "serial": "abc",
                   "pci_segment": 1})
        );
        assert_eq!(
            body(
                DeviceKind::Disk,
                "path=/d,bw_size=1000,bw_one_time_burst=100,bw_refill_time=10,ops_size=5"
            ),
            json!({"path": "/d", "rate_limiter_config":
                   {"bandwidth": {"size": 1000, "one_time_burst": 100, "refill_time": 10}}})
        );
        assert_eq!(
            body(DeviceKind::Disk, "path=/d,queue_affinity=[0@[0,1],1@[2-3]]"),
            json!({"path": "/d", "queue_affinity": [
                {"queue_index": 0, "host_cpus": [0, 1]},
                {"queue_index": 1, "host_cpus": [2, 3]}]})
        );
        assert_eq!(
            body(DeviceKind::Disk, "path=/d,_disable_io_uring=on"),
            json!({"path": "/d", "disable_io_uring": true})
        );
    }

    #[test]
    fn net_with_fds_goes_by_scm_rights() {
        let r = device_request(
            DeviceKind::Net,
            "fd=[3,4],mac=12:34:56:78:90:ab,num_queues=4,id=net0",
        )
        .unwrap();
        assert_eq!(r.fds, vec![3, 4]);
        // As ch-remote: the descriptors are taken out of the body.
        assert_eq!(
            r.body,
            json!({"mac": "12:34:56:78:90:ab", "num_queues": 4, "id": "net0"})
        );
        assert_eq!(
            body(
                DeviceKind::Net,
                "tap=tap0,ip=192.168.249.1,mask=255.255.255.0,mtu=1500,vhost_mode=server,offload_tso=off"
            ),
            json!({"tap": "tap0", "ip": "192.168.249.1", "mask": "255.255.255.0", "mtu": 1500,
                   "vhost_mode": "Server", "offload_tso": false})
        );
        assert_eq!(
            body(DeviceKind::Net, "vhost_user=on,socket=/s,vhost_mode=client"),
            json!({"vhost_user": true, "vhost_socket": "/s", "vhost_mode": "Client"})
        );
        assert!(device_request(DeviceKind::Net, "vhost_mode=both").is_err());
        assert!(device_request(DeviceKind::Net, "fd=[3,x]").is_err());
    }

    #[test]
    fn fs_pmem_vsock() {
        assert_eq!(
            body(
                DeviceKind::Fs,
                "tag=myfs,socket=/tmp/virtiofs,num_queues=1,queue_size=512"
            ),
            json!({"tag": "myfs", "socket": "/tmp/virtiofs", "num_queues": 1, "queue_size": 512})
        );
        assert_eq!(
            device_request(DeviceKind::Fs, "socket=/x"),
            Err(RemoteError::MissingKey {
                what: "virtio-fs",
                key: "tag"
            })
        );
        // pmem sizes are ByteSized in Cloud Hypervisor: 1G -> bytes.
        assert_eq!(
            body(DeviceKind::Pmem, "file=/tmp/pmem,size=1G,discard_writes=on"),
            json!({"file": "/tmp/pmem", "size": 1u64 << 30, "discard_writes": true})
        );
        assert!(device_request(DeviceKind::Pmem, "file=/p,size=big").is_err());
        assert_eq!(
            body(DeviceKind::Vsock, "cid=3,socket=/tmp/ch.vsock,id=vsock0"),
            json!({"cid": 3, "socket": "/tmp/ch.vsock", "id": "vsock0"})
        );
        assert!(device_request(DeviceKind::Vsock, "socket=/x").is_err());
        assert!(device_request(DeviceKind::Vsock, "cid=-1,socket=/x").is_err());
    }

    #[test]
    fn device_user_device_vdpa() {
        assert_eq!(
            body(
                DeviceKind::Device,
                "path=/sys/bus/pci/devices/0000:01:00.0/,iommu=on,id=vfio0"
            ),
            json!({"path": "/sys/bus/pci/devices/0000:01:00.0/", "iommu": true, "id": "vfio0"})
        );
        assert_eq!(
            body(DeviceKind::UserDevice, "socket=/tmp/user.sock,id=ud0"),
            json!({"socket": "/tmp/user.sock", "id": "ud0"})
        );
        assert_eq!(
            body(DeviceKind::Vdpa, "path=/dev/vhost-vdpa-0,num_queues=2"),
            json!({"path": "/dev/vhost-vdpa-0", "num_queues": 2})
        );
        assert!(device_request(DeviceKind::Vdpa, "num_queues=2").is_err());
    }

    #[test]
    fn bad_syntax_is_refused() {
        assert!(matches!(
            device_request(DeviceKind::Disk, "path=/d,bogus=1"),
            Err(RemoteError::UnknownKey { .. })
        ));
        assert!(matches!(
            device_request(DeviceKind::Disk, "path=/d,path=/e"),
            Err(RemoteError::Syntax { .. })
        ));
        assert!(device_request(DeviceKind::Disk, "readonly=maybe").is_err());
        assert!(device_request(DeviceKind::Disk, "num_queues=four").is_err());
        assert!(device_request(DeviceKind::Disk, "path=").is_err());
        assert!(device_request(DeviceKind::Net, "fd=[3,4").is_err());
        assert!(device_request(DeviceKind::Disk, "queue_affinity=[x@[1]]").is_err());
        // A bare boolean key means on, as in Cloud Hypervisor's Toggle.
        assert_eq!(
            body(DeviceKind::Disk, "path=/d,readonly"),
            json!({"path": "/d", "readonly": true})
        );
    }

    #[test]
    fn restore_takes_net_fds_out() {
        let r = restore_request(
            "source_url=file:///tmp/snap,prefault=on,net_fds=[net0@[3,4],net1@[5]],memory_restore_mode=ondemand",
        )
        .unwrap();
        assert_eq!(r.fds, vec![3, 4, 5]);
        assert_eq!(
            r.body,
            json!({"source_url": "file:///tmp/snap", "prefault": true,
                   "net_fds": [{"id": "net0", "num_fds": 2}, {"id": "net1", "num_fds": 1}],
                   "memory_restore_mode": "OnDemand"})
        );
        assert!(restore_request("prefault=on").is_err());
        assert!(restore_request("source_url=file:///x,memory_restore_mode=lazy").is_err());
    }

    #[test]
    fn resize_bodies() {
        assert_eq!(
            resize_body(Some("4"), Some("2G"), None).unwrap(),
            json!({"desired_vcpus": 4, "desired_ram": 2u64 << 30})
        );
        assert_eq!(
            resize_body(None, None, Some("512M")).unwrap(),
            json!({"desired_balloon": 512u64 << 20})
        );
        assert_eq!(resize_body(None, None, None), Err(RemoteError::EmptyResize));
        assert!(resize_body(Some("300"), None, None).is_err());
        assert!(resize_body(None, Some("lots"), None).is_err());
    }

    #[test]
    fn commands_map_to_ch_remote_requests() {
        let call = |args: &[&str]| {
            let mut full = vec!["trenv-remote", "--api-socket", "/s"];
            full.extend_from_slice(args);
            build_call(Cli::try_parse_from(full).unwrap().command).unwrap()
        };
        let c = call(&["ping"]);
        assert_eq!((c.method, c.endpoint, c.body), ("GET", "vmm.ping", None));
        let c = call(&["shutdown-vmm"]);
        assert_eq!((c.method, c.endpoint), ("PUT", "vmm.shutdown"));
        assert_eq!(call(&["info"]).method, "GET");
        assert_eq!(call(&["power-button"]).endpoint, "vm.power-button");
        let c = call(&["resize-zone", "--id", "mem0", "--size", "1G"]);
        assert_eq!(
            serde_json::from_str::<Value>(&c.body.unwrap()).unwrap(),
            json!({"id": "mem0", "desired_ram": 1u64 << 30})
        );
        let c = call(&["resize-disk", "--disk", "disk0", "--size", "2G"]);
        assert_eq!(
            serde_json::from_str::<Value>(&c.body.unwrap()).unwrap(),
            json!({"id": "disk0", "desired_size": 2u64 << 30})
        );
        let c = call(&["send-migration", "unix:/tmp/m", "--local"]);
        assert_eq!(
            serde_json::from_str::<Value>(&c.body.unwrap()).unwrap(),
            json!({"destination_url": "unix:/tmp/m", "local": true})
        );
        let c = call(&["remove-device", "disk0"]);
        assert_eq!(c.body.unwrap(), r#"{"id":"disk0"}"#);
        let c = call(&["add-net", "fd=[7],num_queues=2"]);
        assert_eq!((c.endpoint, c.fds), ("vm.add-net", vec![7]));
    }

    #[test]
    fn error_bodies_and_pretty_output() {
        assert_eq!(
            error_body_text(r#"["Error booting VM","VM is not created"]"#),
            "Error booting VM: VM is not created"
        );
        assert_eq!(error_body_text("plain text\n"), "plain text");
        assert_eq!(pretty_body(r#"{"a":1}"#), "{\n  \"a\": 1\n}");
    }

    /// The bodies we build must be what the server's models read, with no field left unread.
    #[test]
    fn bodies_match_the_api_models() {
        use api::models::*;
        fn check<T: serde::de::DeserializeOwned>(body: &Value) {
            let parsed = from_json::<T>(body.to_string().as_bytes())
                .unwrap_or_else(|e| panic!("{body} does not parse: {e}"));
            assert!(
                parsed.ignored_fields.is_empty(),
                "{body}: unread fields {:?}",
                parsed.ignored_fields
            );
        }
        check::<DiskConfig>(&body(
            DeviceKind::Disk,
            "path=/d,readonly=on,direct=on,iommu=off,num_queues=2,queue_size=256,id=d0,serial=s,\
             pci_segment=0,rate_limit_group=g,bw_size=1,bw_refill_time=2,ops_size=3,ops_refill_time=4",
        ));
        check::<DiskConfig>(&body(DeviceKind::Disk, "vhost_user=on,socket=/s"));
        check::<NetConfig>(&body(
            DeviceKind::Net,
            "tap=tap0,ip=192.168.249.1,mask=255.255.255.0,mac=12:34:56:78:90:ab,\
             host_mac=12:34:56:78:90:ac,mtu=1400,iommu=off,num_queues=2,queue_size=256,id=n0,\
             vhost_user=off,socket=/s,vhost_mode=server,offload_tso=on,offload_ufo=on,offload_csum=on,\
             pci_segment=0",
        ));
        check::<FsConfig>(&body(
            DeviceKind::Fs,
            "tag=t,socket=/s,num_queues=1,queue_size=1024,id=f0,pci_segment=0",
        ));
        check::<PmemConfig>(&body(
            DeviceKind::Pmem,
            "file=/p,size=128M,iommu=off,discard_writes=on,id=p0,pci_segment=0",
        ));
        check::<VsockConfig>(&body(
            DeviceKind::Vsock,
            "cid=3,socket=/v,iommu=off,id=v0,pci_segment=0",
        ));
        check::<DeviceConfig>(&body(
            DeviceKind::Device,
            "path=/sys/x,iommu=on,id=x0,pci_segment=0",
        ));
        check::<UserDeviceConfig>(&body(
            DeviceKind::UserDevice,
            "socket=/u,id=u0,pci_segment=0",
        ));
        check::<VdpaConfig>(&body(
            DeviceKind::Vdpa,
            "path=/dev/vhost-vdpa-0,num_queues=2,iommu=on,id=v0,pci_segment=0",
        ));
        check::<RestoreConfig>(
            &restore_request(
                "source_url=file:///s,prefault=on,net_fds=[n0@[3,4]],memory_restore_mode=ondemand,resume=on",
            )
            .unwrap()
            .body,
        );
        check::<VmResize>(&resize_body(Some("2"), Some("1G"), Some("0")).unwrap());
        let call = |args: &[&str]| {
            let mut full = vec!["trenv-remote", "--api-socket", "/s"];
            full.extend_from_slice(args);
            let c = build_call(Cli::try_parse_from(full).unwrap().command).unwrap();
            serde_json::from_str::<Value>(&c.body.unwrap()).unwrap()
        };
        check::<VmResizeZone>(&call(&["resize-zone", "--id", "z", "--size", "1G"]));
        check::<VmResizeDisk>(&call(&["resize-disk", "--disk", "d", "--size", "1G"]));
        check::<VmRemoveDevice>(&call(&["remove-device", "d0"]));
        check::<VmSnapshotConfig>(&call(&["snapshot", "file:///s"]));
        check::<SendMigrationData>(&call(&["send-migration", "unix:/m"]));
        check::<ReceiveMigrationData>(&call(&["receive-migration", "unix:/m"]));
    }

    #[test]
    fn closed_fds_are_caught_before_sending() {
        assert_eq!(check_fds_open(&[-1]), Err(RemoteError::BadFd(-1)));
        assert_eq!(check_fds_open(&[987_654]), Err(RemoteError::BadFd(987_654)));
        assert!(check_fds_open(&[0]).is_ok() || check_fds_open(&[2]).is_ok());
    }
}
