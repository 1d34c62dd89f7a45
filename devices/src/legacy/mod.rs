//! Legacy PC devices a Linux guest expects: the COM1 16550 UART and the i8042 controller (CPU reset only).

pub mod i8042;
pub mod serial;

pub use i8042::I8042Device;
pub use serial::{SerialDevice, SerialDeviceState, SerialError};
