//! vCPU threads: each runs KVM_RUN in a loop and dispatches port I/O and MMIO exits to the buses.
//!
//! Stopping: the VMM sets the shared stop flag and sends `VCPU_KICK_SIGNAL` to the thread, which makes a
//! blocked KVM_RUN return EINTR (an AP parked waiting for INIT/SIPI sits in KVM_RUN indefinitely).

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::exit::ExitNotifier;
use devices::ioapic::Ioapic;
use devices::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable};

/// Real-time signal used to interrupt KVM_RUN.
pub fn vcpu_kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn noop_signal_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler once per process; without a handler the signal would kill us.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(vcpu_kick_signal(), noop_signal_handler)
}

/// What the VMM asks of its vCPU threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunRequest {
    Run,
    Pause,
    Stop,
}

#[derive(Debug)]
struct ControlState {
    request: RunRequest,
    /// Threads currently parked because of a pause request.
    parked: usize,
    /// Counts request changes, so that a deferred release ([`VcpuControl::run_unless_changed`]) never
    /// undoes a later pause or stop.
    changes: u64,
}

/// Pause/resume/stop handshake between the VMM and its vCPU threads. A request is observed when a thread
/// is out of KVM_RUN, so every change is followed by kicks until the threads have acknowledged it.
#[derive(Debug)]
pub struct VcpuControl {
    state: Mutex<ControlState>,
    changed: Condvar,
}

impl Default for VcpuControl {
    fn default() -> Self {
        VcpuControl {
            state: Mutex::new(ControlState {
                request: RunRequest::Run,
                parked: 0,
                changes: 0,
            }),
            changed: Condvar::new(),
        }
    }
}

impl VcpuControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn request(&self) -> RunRequest {
        self.lock().request
    }

    pub fn set_request(&self, request: RunRequest) {
        let mut state = self.lock();
        state.request = request;
        state.changes += 1;
        drop(state);
        self.changed.notify_all();
    }

    /// The current request's change count, for [`VcpuControl::run_unless_changed`].
    pub fn changes(&self) -> u64 {
        self.lock().changes
    }

    /// Lets the threads run, unless another request was made since `changes` was read.
    pub fn run_unless_changed(&self, changes: u64) {
        let mut state = self.lock();
        if state.changes != changes {
            return;
        }
        state.request = RunRequest::Run;
        state.changes += 1;
        drop(state);
        self.changed.notify_all();
    }

    /// Called by a vCPU thread between KVM_RUNs: parks while paused, after `before_park` (which settles
    /// the vCPU's state). Returns false when the thread must exit.
    fn checkpoint(&self, before_park: &mut dyn FnMut()) -> bool {
        let mut state = self.lock();
        if state.request == RunRequest::Pause {
            before_park();
            state.parked += 1;
            self.changed.notify_all();
            while state.request == RunRequest::Pause {
                state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            state.parked -= 1;
            self.changed.notify_all();
        }
        state.request != RunRequest::Stop
    }

    /// Waits (kicking the threads) until `count` threads are parked or `deadline` passes.
    pub fn wait_parked(&self, threads: &[JoinHandle<()>], deadline: Instant) -> bool {
        loop {
            let running = threads.iter().filter(|t| !t.is_finished()).count();
            {
                let state = self.lock();
                if state.parked >= running {
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            // A kick can land just before a thread enters KVM_RUN; repeat until all have parked.
            for t in threads.iter().filter(|t| !t.is_finished()) {
                kick(t);
            }
            let state = self.lock();
            let _ = self
                .changed
                .wait_timeout(state, Duration::from_micros(500))
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// What every vCPU thread shares with the VMM.
#[derive(Clone)]
pub struct VcpuShared {
    pub pio_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub ioapic: Arc<Mutex<Ioapic>>,
    pub exit: ExitNotifier,
    pub control: Arc<VcpuControl>,
    /// The first fatal vCPU error, reported to the VMM's main thread through the exit eventfd.
    pub failure: Arc<Mutex<Option<String>>>,
}

impl VcpuShared {
    fn fail(&self, message: String) {
        log::error!("{message}");
        if let Ok(mut failure) = self.failure.lock() {
            failure.get_or_insert(message);
        }
        // Wake the main thread; the failure slot says why.
        let _ = self.exit.eventfd().write(1);
    }
}

/// Limits logs a guest can trigger (unknown ports/addresses) to a few lines per vCPU.
struct RateLimitedLog {
    remaining: u32,
}

impl RateLimitedLog {
    fn warn(&mut self, message: impl FnOnce() -> String) {
        if self.remaining > 0 {
            self.remaining -= 1;
            log::warn!(
                "{}{}",
                message(),
                if self.remaining == 0 {
                    " (further such messages suppressed)"
                } else {
                    ""
                }
            );
        }
    }
}

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
}

impl Vcpu {
    /// Runs `vcpu` on a thread of its own. The thread holds the vCPU's lock only while it is inside one
    /// KVM_RUN and its exit handling, so the VMM can read or load its state whenever the thread is parked.
    pub fn spawn(vcpu: Arc<Mutex<Vcpu>>, shared: VcpuShared) -> std::io::Result<JoinHandle<()>> {
        let id = vcpu.lock().unwrap_or_else(|e| e.into_inner()).id;
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let mut unknown_access = RateLimitedLog { remaining: 16 };
                let mut settle = || {
                    vcpu.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .complete_pending_io()
                };
                while shared.control.checkpoint(&mut settle) {
                    let mut vcpu = vcpu.lock().unwrap_or_else(|e| e.into_inner());
                    if !vcpu.run_once(&shared, &mut unknown_access) {
                        return;
                    }
                }
            })
    }

    /// Lets KVM finish the instruction behind the last I/O exit (a read's data lands in its register, RIP
    /// moves past it) without running guest code, so that saved state never holds a half-done access.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            other => log::debug!(
                "vcpu{}: settling before pause returned {:?}",
                self.id,
                other.err()
            ),
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    /// One KVM_RUN and the handling of its exit; false when the thread must end.
    fn run_once(&mut self, shared: &VcpuShared, unknown_access: &mut RateLimitedLog) -> bool {
        {
            let io_pending = match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    Some((false, port as u64, data.as_ptr() as *mut u8, data.len()))
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    Some((true, port as u64, data.as_mut_ptr(), data.len()))
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if shared.mmio_bus.read(addr, data).is_err() {
                        data.fill(0xff);
                        unknown_access
                            .warn(|| format!("vcpu{}: read of unmapped MMIO {addr:#x}", self.id));
                    }
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if shared.mmio_bus.write(addr, data).is_err() {
                        unknown_access
                            .warn(|| format!("vcpu{}: write to unmapped MMIO {addr:#x}", self.id));
                    }
                    None
                }
                Ok(VcpuExit::IoapicEoi(vector)) => {
                    shared
                        .ioapic
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .end_of_interrupt(vector);
                    None
                }
                Ok(VcpuExit::Hlt) => {
                    // With the LAPIC in KVM a halt is handled in the kernel; seeing it means no irqchip.
                    shared.fail(format!("vcpu{}: unexpected HLT exit", self.id));
                    return false;
                }
                Ok(VcpuExit::Shutdown) => {
                    shared.fail(format!(
                        "vcpu{}: the guest triple-faulted (KVM_EXIT_SHUTDOWN)",
                        self.id
                    ));
                    return false;
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    let reason = match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => devices::exit::ExitReason::Reset,
                        _ => devices::exit::ExitReason::PowerOff,
                    };
                    shared.exit.notify(reason);
                    return false;
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    shared.fail(format!(
                        "vcpu{}: KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})",
                        self.id
                    ));
                    return false;
                }
                Ok(VcpuExit::InternalError) => {
                    let detail = self.internal_error_detail();
                    shared.fail(format!(
                        "vcpu{}: KVM internal error (emulation failure?){detail}",
                        self.id
                    ));
                    return false;
                }
                Ok(VcpuExit::Intr) => None,
                Ok(other) => {
                    shared.fail(format!("vcpu{}: unhandled exit {other:?}", self.id));
                    return false;
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // Kicked: the loop condition decides whether to go back in.
                    None
                }
                Err(e) => {
                    shared.fail(format!("vcpu{}: KVM_RUN failed: {e}", self.id));
                    return false;
                }
            };
            if let Some((is_in, port, ptr, len)) = io_pending {
                self.port_io(shared, unknown_access, is_in, port, ptr, len);
            }
        }
        true
    }

    /// Handles an I/O exit element by element: `rep ins/outs` delivers `count` elements of `size` bytes.
    fn port_io(
        &mut self,
        shared: &VcpuShared,
        unknown_access: &mut RateLimitedLog,
        is_in: bool,
        port: u64,
        ptr: *mut u8,
        len: usize,
    ) {
        // SAFETY: the kvm_run page is mapped for the life of the vCPU fd and KVM_EXIT_IO is the exit reason.
        let size = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.io.size } as usize;
        // SAFETY: `ptr`/`len` describe the data area inside the same kvm_run mapping; nothing else aliases
        // it while this thread handles the exit.
        let data = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
        for element in data.chunks_mut(size.max(1)) {
            let result = if is_in {
                shared.pio_bus.read(port, element)
            } else {
                shared.pio_bus.write(port, element)
            };
            if result.is_err() {
                if is_in {
                    element.fill(0xff);
                }
                let id = self.id;
                unknown_access.warn(|| {
                    format!(
                        "vcpu{id}: {} unmapped port {port:#x}",
                        if is_in { "read from" } else { "write to" }
                    )
                });
            }
        }
    }

    fn internal_error_detail(&mut self) -> String {
        // SAFETY: KVM_EXIT_INTERNAL_ERROR is the exit reason, so the `internal` union member is valid.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let regs = self
            .fd
            .get_regs()
            .map(|r| format!(" at rip {:#x}", r.rip))
            .unwrap_or_default();
        format!(
            ": suberror {}{regs}, data {:x?}",
            internal.suberror,
            &internal.data[..n]
        )
    }
}

/// Interrupts a vCPU thread's KVM_RUN.
pub fn kick(handle: &JoinHandle<()>) {
    let _ = handle.kill(vcpu_kick_signal());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deferred_release_never_undoes_a_later_request() {
        let control = VcpuControl::default();
        control.set_request(RunRequest::Pause);
        let taken = control.changes();
        // Another caller pauses (or stops) the VM before the deferred release runs.
        control.set_request(RunRequest::Pause);
        control.run_unless_changed(taken);
        assert_eq!(control.request(), RunRequest::Pause);
        control.set_request(RunRequest::Stop);
        control.run_unless_changed(taken);
        assert_eq!(control.request(), RunRequest::Stop);
        // Nothing in between: the release lets the threads run.
        control.set_request(RunRequest::Pause);
        let taken = control.changes();
        control.run_unless_changed(taken);
        assert_eq!(control.request(), RunRequest::Run);
        // And only once: a stale copy after that does nothing either.
        control.set_request(RunRequest::Pause);
        control.run_unless_changed(taken);
        assert_eq!(control.request(), RunRequest::Pause);
    }
}
