pub struct VirtioPciDevice;
pub const VIRTIO_PCI_BAR_SIZE: u64 = 0;
