//! Devices added to and removed from a VM after boot (ACPI PCI hotplug), as `vm.add-*` and
//! `vm.remove-device` do on a running or paused VM, and the VM configuration kept in step with them.
//!
//! Adding creates the device in the lowest free slot, announces it to the guest and answers with its id
//! and address. Removing only asks the guest; the device goes when the guest ejects it
//! ([`Vm::complete_ejections`], driven by the VMM's event loop), and leaves the configuration then. The
//! configuration always lists exactly the devices on the bus, so a reboot or a later snapshot brings back
//! what the guest had. Device ids are written into the configuration on the first hotplug operation: the
//! positional defaults (`_disk0`, `_net1`, ...) would otherwise shift when a device before them goes.

use std::collections::HashSet;
use std::os::fd::OwnedFd;

use api::models::{
    DiskConfig, MacAddr, NetConfig, PciDeviceInfo, PmemConfig, VmConfig, VsockConfig,
};

use crate::device_manager::HotplugDevice;
use crate::pci_devices::{DiskSpec, PciError, VsockSpec};
use crate::vm::Vm;

/// A device to add, as the API received it.
pub enum HotplugRequest {
    Disk(DiskConfig),
    Pmem(PmemConfig),
    /// The tap fds that came with the request.
    Net(NetConfig, Vec<OwnedFd>),
    Vsock(VsockConfig),
}

impl HotplugRequest {
    pub fn kind(&self) -> &'static str {
        match self {
            HotplugRequest::Disk(_) => "disk",
            HotplugRequest::Pmem(_) => "pmem",
            HotplugRequest::Net(..) => "net",
            HotplugRequest::Vsock(_) => "vsock",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    #[error("device id '{0}' is already in use")]
    DuplicateId(String),
    #[error("the VM already has a vsock device")]
    VsockExists,
    #[error("invalid device configuration")]
    Config(#[from] api::models::ConfigError),
    #[error("no device has id '{0}'")]
    UnknownDevice(String),
    #[error("device '{0}' cannot be removed (only disks, pmem, net and vsock devices can)")]
    NotRemovable(String),
    #[error("no free PCI slot on bus 0")]
    NoFreeSlot,
    #[error("the VM is parked (its memory was dropped): repurpose it first")]
    Parked,
    #[error("cannot add the device")]
    Device(#[source] crate::device_manager::DeviceError),
}

impl HotplugError {
    /// The HTTP status the API answers with: the caller's mistakes are 4xx, the VMM's failures 5xx.
    pub fn status(&self) -> u16 {
        use crate::pci_devices::PciError as P;
        match self {
            HotplugError::DuplicateId(_)
            | HotplugError::VsockExists
            | HotplugError::Config(_)
            | HotplugError::NotRemovable(_) => 400,
            HotplugError::UnknownDevice(_) => 404,
            HotplugError::NoFreeSlot | HotplugError::Parked => 409,
            HotplugError::Device(e) => match e.pci() {
                // What the request named cannot be opened or is refused by the device: a bad request.
                Some(
                    P::Block { .. }
                    | P::Pmem { .. }
                    | P::Net { .. }
                    | P::Vsock(_)
                    | P::Unsupported(_)
                    | P::DuplicateId(_),
                ) => 400,
                Some(P::Pci(devices::pci::PciError::NoFreeSlot)) => 409,
                _ => 500,
            },
        }
    }
}

impl From<crate::device_manager::DeviceError> for HotplugError {
    fn from(e: crate::device_manager::DeviceError) -> Self {
        if let Some(PciError::Pci(devices::pci::PciError::NoFreeSlot)) = e.pci() {
            return HotplugError::NoFreeSlot;
        }
        HotplugError::Device(e)
    }
}

/// Writes every device's id into the configuration (the positional default where none was given), as the
/// device manager names them, and every NIC's MAC (which defaults by position too).
pub fn pin_device_ids(config: &mut VmConfig) {
    for (n, d) in config.disks.iter_mut().flatten().enumerate() {
        d.id.get_or_insert_with(|| format!("_disk{n}"));
    }
    for (n, d) in config.net.iter_mut().flatten().enumerate() {
        d.id.get_or_insert_with(|| format!("_net{n}"));
        d.mac
            .get_or_insert_with(|| MacAddr(devices::virtio::net::generated_mac(n as u32)));
    }
    for (n, d) in config.pmem.iter_mut().flatten().enumerate() {
        d.id.get_or_insert_with(|| format!("_pmem{n}"));
    }
    if let Some(v) = config.vsock.as_mut() {
        v.id.get_or_insert_with(|| "_vsock".to_string());
    }
}

/// Ids of the removable devices of a configuration whose ids are pinned.
fn removable_ids(config: &VmConfig) -> impl Iterator<Item = &String> {
    let disks = config.disks.iter().flatten().filter_map(|d| d.id.as_ref());
    let net = config.net.iter().flatten().filter_map(|d| d.id.as_ref());
    let pmem = config.pmem.iter().flatten().filter_map(|d| d.id.as_ref());
    let vsock = config.vsock.iter().filter_map(|d| d.id.as_ref());
    disks.chain(net).chain(pmem).chain(vsock)
}

/// Drops device `id` from `config` (its ids pinned first); false if no disk, NIC, pmem or vsock has it.
pub fn remove_from_config(config: &mut VmConfig, id: &str) -> bool {
    pin_device_ids(config);
    let is = |other: &Option<String>| other.as_deref() == Some(id);
    let mut found = false;
    if let Some(disks) = config.disks.as_mut() {
        found |= disks.iter().any(|d| is(&d.id));
        disks.retain(|d| !is(&d.id));
    }
    if let Some(net) = config.net.as_mut() {
        found |= net.iter().any(|d| is(&d.id));
        net.retain(|d| !is(&d.id));
    }
    if let Some(pmem) = config.pmem.as_mut() {
        found |= pmem.iter().any(|d| is(&d.id));
        pmem.retain(|d| !is(&d.id));
    }
    if config.vsock.as_ref().is_some_and(|v| is(&v.id)) {
        config.vsock = None;
        found = true;
    }
    found
}

/// `prefix<n>` for the lowest n no device uses.
fn fresh_id(prefix: &str, taken: &HashSet<String>) -> String {
    (0..)
        .map(|n| format!("{prefix}{n}"))
        .find(|id| !taken.contains(id))
        .unwrap_or_else(|| prefix.to_string())
}

/// The id a request asks for, or a fresh default; refused if taken.
fn choose_id(
    wanted: &Option<String>,
    prefix: &str,
    taken: &HashSet<String>,
) -> Result<String, HotplugError> {
    match wanted {
        Some(id) if taken.contains(id) => Err(HotplugError::DuplicateId(id.clone())),
        Some(id) => Ok(id.clone()),
        None => Ok(fresh_id(prefix, taken)),
    }
}

impl Vm {
    /// Adds a device to this running (or paused) VM: checks the request against the configuration,
    /// creates the device, announces it to the guest and records it in the configuration. On failure
    /// neither the VM nor its configuration change.
    pub fn hot_add(&mut self, request: HotplugRequest) -> Result<PciDeviceInfo, HotplugError> {
        if self.parked {
            return Err(HotplugError::Parked);
        }
        let mut config = self.config.clone();
        pin_device_ids(&mut config);
        let taken: HashSet<String> = removable_ids(&config)
            .cloned()
            .chain(self.devices.pci.devices().into_iter().map(|(id, _)| id))
            .collect();
        let device = match request {
            HotplugRequest::Disk(mut disk) => {
                disk.validate()?;
                disk.id = Some(choose_id(&disk.id, "_disk", &taken)?);
                let spec = DiskSpec::try_from(&disk).map_err(device_error)?;
                let id = disk.id.clone().unwrap_or_default();
                config.disks.get_or_insert_with(Vec::new).push(disk);
                HotplugDevice::Disk(id, spec)
            }
            HotplugRequest::Pmem(mut pmem) => {
                pmem.validate()?;
                pmem.id = Some(choose_id(&pmem.id, "_pmem", &taken)?);
                let spec = crate::pci_devices::pmem_spec(0, &pmem).map_err(device_error)?;
                config.pmem.get_or_insert_with(Vec::new).push(pmem);
                HotplugDevice::Pmem(spec)
            }
            HotplugRequest::Net(mut net, fds) => {
                net.validate()?;
                net.id = Some(choose_id(&net.id, "_net", &taken)?);
                let n = config.net.as_ref().map_or(0, Vec::len);
                if net.mac.is_none() {
                    // A generated MAC no other NIC of this VM has (theirs are pinned above).
                    let used: Vec<MacAddr> =
                        config.net.iter().flatten().filter_map(|d| d.mac).collect();
                    net.mac = (0..=u8::MAX)
                        .map(|k| {
                            MacAddr(devices::virtio::net::generated_mac(n as u32 + u32::from(k)))
                        })
                        .find(|mac| !used.contains(mac));
                }
                // Descriptors live only as long as this device: the configuration keeps no fd numbers.
                let mut recorded = net.clone();
                recorded.fds = None;
                config.net.get_or_insert_with(Vec::new).push(recorded);
                HotplugDevice::Net {
                    n,
                    config: net,
                    fds,
                }
            }
            HotplugRequest::Vsock(mut vsock) => {
                if config.vsock.is_some() {
                    return Err(HotplugError::VsockExists);
                }
                vsock.validate()?;
                // Cloud Hypervisor's name for the one vsock device.
                let default = Some("_vsock".to_string()).filter(|d| !taken.contains(d));
                vsock.id = Some(choose_id(&vsock.id.or(default), "_vsock", &taken)?);
                let spec = VsockSpec::try_from(&vsock).map_err(device_error)?;
                config.vsock = Some(vsock);
                HotplugDevice::Vsock(spec)
            }
        };
        config.validate()?;
        let (id, bdf) = self
            .devices
            .hot_add(device, &self.memory, self.config.memory.size)?;
        self.config = config;
        // A snapshot taken earlier in this pause described a VM without the device.
        self.paused_state = None;
        Ok(PciDeviceInfo::new(id, 0, bdf.bus, bdf.device, bdf.function))
    }

    /// Asks the guest to eject device `id`. The device and its configuration entry stay until the guest
    /// ejects it (see [`Self::complete_ejections`]).
    pub fn request_removal(&mut self, id: &str) -> Result<(), HotplugError> {
        if self.parked {
            return Err(HotplugError::Parked);
        }
        let mut config = self.config.clone();
        pin_device_ids(&mut config);
        let on_bus = self.devices.pci.bdf(id).is_some();
        if !removable_ids(&config).any(|r| r == id) {
            return Err(if on_bus {
                HotplugError::NotRemovable(id.to_string())
            } else {
                HotplugError::UnknownDevice(id.to_string())
            });
        }
        if !on_bus {
            // In the configuration but not on the bus: already ejected and being released.
            return Err(HotplugError::UnknownDevice(id.to_string()));
        }
        self.devices.request_removal(id)?;
        Ok(())
    }

    /// Releases the devices the guest ejected and drops them from the configuration; returns their ids.
    pub fn complete_ejections(&mut self) -> Vec<String> {
        let ids = self.devices.release_ejected();
        for id in &ids {
            if remove_from_config(&mut self.config, id) {
                log::info!("device {id} removed");
            } else {
                // The guest may eject any slot, the rng's or the console's too; they come back on reboot.
                log::warn!("the guest ejected device {id}, which the configuration keeps");
            }
        }
        if !ids.is_empty() {
            self.paused_state = None;
        }
        ids
    }

    /// Readable when the guest ejected a device: call [`Self::complete_ejections`] then.
    pub fn hotplug_eventfd(&self) -> &vmm_sys_util::eventfd::EventFd {
        self.devices.hotplug_eventfd()
    }
}

fn device_error(e: PciError) -> HotplugError {
    HotplugError::Device(crate::device_manager::DeviceError::Pci(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(id: Option<&str>) -> DiskConfig {
        DiskConfig {
            path: Some("/x.img".into()),
            id: id.map(String::from),
            ..Default::default()
        }
    }

    #[test]
    fn ids_are_pinned_positionally_and_removal_keeps_the_others() {
        let mut config = VmConfig {
            disks: Some(vec![disk(None), disk(Some("data")), disk(None)]),
            pmem: Some(vec![PmemConfig {
                file: "/p".into(),
                ..Default::default()
            }]),
            vsock: Some(VsockConfig::new(3, "/v.sock")),
            ..Default::default()
        };
        pin_device_ids(&mut config);
        let ids: Vec<&String> = removable_ids(&config).collect();
        assert_eq!(ids, ["_disk0", "data", "_disk2", "_pmem0", "_vsock"]);

        assert!(remove_from_config(&mut config, "_disk0"));
        let disks: Vec<_> = config
            .disks
            .iter()
            .flatten()
            .map(|d| d.id.clone().unwrap())
            .collect();
        assert_eq!(disks, ["data", "_disk2"], "the others keep their ids");
        assert!(remove_from_config(&mut config, "_vsock"));
        assert!(config.vsock.is_none());
        assert!(!remove_from_config(&mut config, "_vsock"));
        assert!(!remove_from_config(&mut config, "_rng"));
        assert!(remove_from_config(&mut config, "_pmem0"));
        assert_eq!(config.pmem.as_ref().map(Vec::len), Some(0));
    }

    #[test]
    fn nics_keep_their_generated_macs_when_an_earlier_one_goes() {
        let mut config = VmConfig {
            net: Some(vec![NetConfig::default(), NetConfig::default()]),
            ..Default::default()
        };
        let second = MacAddr(devices::virtio::net::generated_mac(1));
        assert!(remove_from_config(&mut config, "_net0"));
        let net = config.net.as_ref().unwrap();
        assert_eq!(net.len(), 1);
        assert_eq!(net[0].id.as_deref(), Some("_net1"));
        assert_eq!(
            net[0].mac,
            Some(second),
            "the MAC it was given at boot, not position 0's"
        );
    }

    #[test]
    fn fresh_ids_fill_gaps_and_taken_ids_are_refused() {
        let taken: HashSet<String> = ["_disk0", "_disk2", "x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(fresh_id("_disk", &taken), "_disk1");
        assert_eq!(choose_id(&None, "_net", &taken).unwrap(), "_net0");
        assert_eq!(choose_id(&Some("y".into()), "_disk", &taken).unwrap(), "y");
        assert!(matches!(
            choose_id(&Some("x".into()), "_disk", &taken),
            Err(HotplugError::DuplicateId(id)) if id == "x"
        ));
    }

    #[test]
    fn the_test_guest_and_the_vmm_agree_on_the_controller() {
        use devices::pci::hotplug as hp;
        assert_eq!(
            test_guest::HOTPLUG_BASE,
            crate::arch::layout::PCI_HOTPLUG_START
        );
        assert_eq!(test_guest::HOTPLUG_MAGIC, hp::MAGIC);
        assert_eq!(test_guest::HOTPLUG_REG_SLOTS_ADDED, hp::REG_SLOTS_ADDED);
        assert_eq!(
            test_guest::HOTPLUG_REG_SLOTS_TO_EJECT,
            hp::REG_SLOTS_TO_EJECT
        );
        assert_eq!(test_guest::HOTPLUG_REG_EJECT, hp::REG_EJECT);
        assert_eq!(test_guest::HOTPLUG_REG_SLOTS_PRESENT, hp::REG_SLOTS_PRESENT);
    }

    #[test]
    fn errors_map_to_client_and_server_statuses() {
        assert_eq!(HotplugError::DuplicateId("a".into()).status(), 400);
        assert_eq!(HotplugError::UnknownDevice("a".into()).status(), 404);
        assert_eq!(HotplugError::NotRemovable("_rng".into()).status(), 400);
        assert_eq!(HotplugError::NoFreeSlot.status(), 409);
        let no_slot = crate::device_manager::DeviceError::Pci(PciError::Pci(
            devices::pci::PciError::NoFreeSlot,
        ));
        assert!(matches!(
            HotplugError::from(no_slot),
            HotplugError::NoFreeSlot
        ));
        let unsupported = device_error(PciError::Unsupported("x"));
        assert_eq!(unsupported.status(), 400);
        let kvm = device_error(PciError::HotplugDisabled);
        assert_eq!(kvm.status(), 500);
    }
}
