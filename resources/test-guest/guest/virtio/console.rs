//! virtio-console constants for the `console` workload (virtio 1.2 §5.3; single port, no features).

/// receiveq (host to guest) and transmitq (guest to host) of port 0.
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
/// Longest text the workload writes.
pub const MAX_TEXT: usize = 1024;
/// Most input bytes the workload echoes.
pub const MAX_ECHO: u64 = 1024;
