//! The `trenv` command line: Cloud Hypervisor's flags, parsed into a `VmConfig`, and the process's main
//! function. It lives in the library so that the benchmark can run the very same VMM entry point.
//!
//! `trenv --kernel K --cmdline C --cpus boot=N --memory size=S --serial tty` boots K and exits 0 when the
//! guest powers off or resets; any failure exits non-zero with one line saying why.
//! `trenv demo` boots the bundled test guest and reports its boot time.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, ConsoleMode, VmConfig};
use crate::vmm::{Vmm, VmmExit};
use crate::{error_chain, event_monitor, logger};

/// `--version`: the first line is what libvirt's Cloud Hypervisor driver parses; the second names trenv.
fn version_text() -> String {
    format!(
        "cloud-hypervisor v{ch}\ntrenv v{trenv} (implements the Cloud Hypervisor v{ch} API)",
        trenv = env!("CARGO_PKG_VERSION"),
        ch = api::CH_COMPAT_VERSION,
    )
}

#[derive(Parser, Debug)]
#[command(
    name = "trenv",
    about = "TrEnv: a template-aware VMM for serverless and agent sandboxes"
)]
#[command(args_conflicts_with_subcommands = true, disable_version_flag = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Kernel to boot: an ELF vmlinux (PVH or 64-bit entry) or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STRING")]
    cmdline: Option<String>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// boot=N[,max=M][,topology=T:C:D:P]
    #[arg(long, value_name = "OPTIONS", default_value = "boot=1")]
    cpus: String,
    /// size=S[,thp=on|off][,prefault=on|off]
    #[arg(long, value_name = "OPTIONS", default_value = "size=512M")]
    memory: String,
    /// off | null | tty | file=PATH | socket=PATH (default null; with --restore, the template's)
    #[arg(long, value_name = "MODE")]
    serial: Option<String>,
    /// Restore from a template instead of booting: source_url=file:///DIR[,memory_restore_mode=cow|copy|ondemand]
    /// [,prefault=on][,resume=on]. The VM stays paused unless resume=on. The template fixes the VM's
    /// devices; only --serial (replaced) and --vsock (the same cid and id: its host socket moves) apply.
    #[arg(long, value_name = "OPTIONS", conflicts_with_all = [
        "kernel", "initramfs", "cmdline", "cpus", "memory", "disk", "pmem", "rng", "console", "net",
    ])]
    restore: Option<String>,
    /// A virtio-blk disk: path=FILE[,readonly=on][,serial=S][,id=ID][,queue_size=N] (repeatable).
    #[arg(long, value_name = "OPTIONS")]
    disk: Vec<String>,
    /// A virtio-pmem device: file=FILE[,size=SIZE][,discard_writes=on][,id=ID] (repeatable). The file is
    /// mapped into the guest; with discard_writes=on the guest's writes stay private to it.
    #[arg(long, value_name = "OPTIONS")]
    pmem: Vec<String>,
    /// The virtio-rng entropy source: src=PATH (default /dev/urandom).
    #[arg(long, value_name = "OPTIONS")]
    rng: Option<String>,
    /// A virtio-vsock device (hybrid, host side on Unix sockets): cid=N,socket=PATH[,id=ID].
    #[arg(long, value_name = "OPTIONS")]
    vsock: Option<String>,
    /// The virtio console: off | null | tty | file=PATH | socket=PATH.
    #[arg(long, value_name = "MODE", default_value = "off")]
    console: String,
    /// A virtio-net device on a tap: tap=NAME[,mac=MAC][,ip=IP,mask=MASK][,mtu=N][,id=ID] (repeatable). The
    /// tap is created if it does not exist and brought up.
    #[arg(long, value_name = "OPTIONS")]
    net: Vec<String>,
    /// Serve the Cloud Hypervisor-compatible REST API on this Unix socket: PATH, path=PATH or fd=N.
    #[arg(long, value_name = "SOCKET")]
    api_socket: Option<String>,
    /// Write lifecycle events as JSON lines: path=FILE or fd=N.
    #[arg(long, value_name = "TARGET")]
    event_monitor: Option<String>,
    /// Log to this file instead of stderr.
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// The VMM's seccomp filter: true (blocked syscalls stop the VMM), log (allowed, logged by the
    /// kernel) or false (no filter).
    #[arg(long, value_name = "MODE", default_value = "true")]
    seccomp: String,
    /// Print the version (and the Cloud Hypervisor API level implemented).
    #[arg(short = 'V', long)]
    version: bool,
    /// More logging: -v info, -vv debug, -vvv trace.
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot the bundled test guest and show its output and boot time.
    Demo {
        /// Guest memory size.
        #[arg(long, default_value = "256M")]
        memory: String,
    },
}

fn config_from_cli(cli: &Cli) -> Result<VmConfig, config::ConfigError> {
    let serial = config::parse_console("--serial", cli.serial.as_deref().unwrap_or("null"))?;
    let console = config::parse_console("--console", &cli.console)?;
    let config = VmConfig {
        payload: config::PayloadConfig {
            kernel: cli.kernel.clone(),
            cmdline: cli.cmdline.clone(),
            initramfs: cli.initramfs.clone(),
            firmware: None,
        },
        cpus: config::parse_cpus(&cli.cpus)?,
        memory: config::parse_memory(&cli.memory)?,
        serial,
        console,
        disks: parse_disks(&cli.disk)?,
        pmem: parse_pmem(&cli.pmem)?,
        net: parse_nets(&cli.net)?,
        vsock: cli.vsock.as_deref().map(parse_vsock).transpose()?,
        rng: match &cli.rng {
            Some(raw) => parse_rng(raw)?,
            None => Default::default(),
        },
        ..Default::default()
    };
    config.validate()?;
    Ok(config)
}

fn run(cli: Cli, start_ns: u64) -> Result<(), String> {
    if cli.version {
        println!("{}", version_text());
        return Ok(());
    }
    logger::init(cli.verbose, cli.log_file.as_deref())
        .map_err(|e| format!("cannot open log file: {e}"))?;
    if let Some(target) = &cli.event_monitor {
        let target = event_monitor::parse(target).map_err(|e| e.to_string())?;
        event_monitor::open(target).map_err(|e| format!("cannot open the event monitor: {e}"))?;
    }
    if let Some(Command::Demo { memory }) = &cli.command {
        return crate::demo::run(memory, start_ns);
    }
    // Before any VM, API or device thread exists: every thread the VMM starts runs under the filter.
    let seccomp = crate::seccomp::parse_mode(&cli.seccomp).map_err(|e| e.to_string())?;
    crate::seccomp::install(seccomp).map_err(|e| e.to_string())?;
    let restore = cli
        .restore
        .as_deref()
        .map(|raw| restore_from_cli(raw, cli.serial.as_deref(), cli.vsock.as_deref()))
        .transpose()
        .map_err(|e| e.to_string())?;
    let config = match (&cli.kernel, &cli.api_socket, &restore) {
        // Only an API socket: the VM is created later by vm.create (or vm.restore).
        (None, Some(_), _) | (_, _, Some(_)) => None,
        _ => Some(config_from_cli(&cli).map_err(|e| e.to_string())?),
    };
    let api = match &cli.api_socket {
        Some(spec) => Some(start_api(spec)?),
        None => None,
    };
    let serving_api = api.is_some();
    // Keys must reach a guest console on the terminal unchanged (Ctrl+C included).
    let tty_console = [cli.serial.as_deref(), Some(cli.console.as_str())].contains(&Some("tty"));
    let _raw_terminal = if tty_console {
        crate::terminal::RawTerminal::enable()
    } else {
        None
    };
    let mut vmm = Vmm::new(api);
    if let Some(config) = config {
        // A run that fails to boot must not leave behind a serial output file it created.
        let created_serial_file = (config.serial.mode == ConsoleMode::File)
            .then(|| config.serial.file.clone())
            .flatten()
            .filter(|path| !path.exists());
        vmm.create(config)
            .map_err(|response| crate::vmm::response_text(&response))?;
        if let Err(e) = vmm.boot() {
            if let Some(path) = created_serial_file {
                let _ = std::fs::remove_file(path);
            }
            return Err(error_chain(&e));
        }
    }
    if let Some((dir, options, resume)) = restore {
        vmm.restore(&dir, &options, resume)
            .map_err(|e| error_chain(&e))?;
    }
    let exit = vmm.run();
    // Dropping the VMM stops the VM and closes the API's request channel, so requests still queued are
    // answered with an error at once instead of holding up the exit.
    drop(vmm);
    if serving_api {
        // The reply to vmm.shutdown (or any last request) must reach its client before the process ends.
        api::server::wait_for_replies(std::time::Duration::from_secs(1));
    }
    let uptime_ms = (event_monitor::monotonic_ns().saturating_sub(start_ns)) as f64 / 1e6;
    match exit {
        VmmExit::Guest(reason) => {
            log::info!("guest {reason:?} after {uptime_ms:.3} ms");
            Ok(())
        }
        VmmExit::Requested => {
            log::info!("shut down by request after {uptime_ms:.3} ms (API: {serving_api})");
            Ok(())
        }
        VmmExit::Failed(message) => Err(message),
    }
}

/// `--disk` values in Cloud Hypervisor's syntax, converted exactly as `trenv-remote add-disk` does.
fn parse_disks(
    raw: &[String],
) -> Result<Option<Vec<api::models::DiskConfig>>, config::ConfigError> {
    if raw.is_empty() {
        return Ok(None);
    }
    raw.iter()
        .map(|spec| {
            let invalid = |reason: String| config::ConfigError::Invalid {
                option: "--disk",
                value: spec.clone(),
                reason,
            };
            let request = crate::remote::device_request(crate::remote::DeviceKind::Disk, spec)
                .map_err(|e| invalid(e.to_string()))?;
            serde_json::from_value(request.body).map_err(|e| invalid(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// `--pmem` values in Cloud Hypervisor's syntax, converted exactly as `trenv-remote add-pmem` does.
fn parse_pmem(raw: &[String]) -> Result<Option<Vec<api::models::PmemConfig>>, config::ConfigError> {
    if raw.is_empty() {
        return Ok(None);
    }
    raw.iter()
        .map(|spec| {
            let invalid = |reason: String| config::ConfigError::Invalid {
                option: "--pmem",
                value: spec.clone(),
                reason,
            };
            let request = crate::remote::device_request(crate::remote::DeviceKind::Pmem, spec)
                .map_err(|e| invalid(e.to_string()))?;
            serde_json::from_value(request.body).map_err(|e| invalid(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// `--vsock` in Cloud Hypervisor's syntax, converted exactly as `trenv-remote add-vsock` does.
fn parse_vsock(raw: &str) -> Result<api::models::VsockConfig, config::ConfigError> {
    let invalid = |reason: String| config::ConfigError::Invalid {
        option: "--vsock",
        value: raw.to_string(),
        reason,
    };
    let request = crate::remote::device_request(crate::remote::DeviceKind::Vsock, raw)
        .map_err(|e| invalid(e.to_string()))?;
    serde_json::from_value(request.body).map_err(|e| invalid(e.to_string()))
}

/// `--net` values in Cloud Hypervisor's syntax, converted exactly as `trenv-remote add-net` does.
fn parse_nets(raw: &[String]) -> Result<Option<Vec<api::models::NetConfig>>, config::ConfigError> {
    if raw.is_empty() {
        return Ok(None);
    }
    raw.iter()
        .map(|spec| {
            let invalid = |reason: String| config::ConfigError::Invalid {
                option: "--net",
                value: spec.clone(),
                reason,
            };
            let request = crate::remote::device_request(crate::remote::DeviceKind::Net, spec)
                .map_err(|e| invalid(e.to_string()))?;
            if !request.fds.is_empty() {
                return Err(invalid("fd= is not supported on the command line".into()));
            }
            serde_json::from_value(request.body).map_err(|e| invalid(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn parse_rng(raw: &str) -> Result<api::models::RngConfig, config::ConfigError> {
    let p = config::OptionParser::parse("--rng", raw, &["src"])?;
    match p.get("src") {
        Some(src) if !src.is_empty() => Ok(api::models::RngConfig {
            src: src.into(),
            ..Default::default()
        }),
        _ => Err(p.invalid("src=PATH is required")),
    }
}

/// `--restore source_url=..,memory_restore_mode=..,prefault=on,resume=on`, with the `--serial` and
/// `--vsock` overrides given beside it.
fn restore_from_cli(
    raw: &str,
    serial: Option<&str>,
    vsock: Option<&str>,
) -> Result<(PathBuf, crate::snapshot::RestoreOptions, bool), config::ConfigError> {
    let p = config::OptionParser::parse(
        "--restore",
        raw,
        &["source_url", "memory_restore_mode", "prefault", "resume"],
    )?;
    let url = p
        .get("source_url")
        .filter(|u| !u.is_empty())
        .ok_or_else(|| p.invalid("source_url= is required"))?;
    let dir = crate::snapshot::url_to_path(url).map_err(|e| p.invalid(e.to_string()))?;
    let mode = match p.get("memory_restore_mode") {
        None => memory_template::image::RestoreMode::Cow,
        Some(m) => m.parse().map_err(|_| {
            p.invalid(format!(
                "memory_restore_mode={m}: expected cow, copy or ondemand"
            ))
        })?,
    };
    let serial = serial
        .map(|s| config::parse_console("--serial", s))
        .transpose()?;
    let options = crate::snapshot::RestoreOptions {
        mode,
        serial,
        prefault: p.bool("prefault")?.unwrap_or(false),
        vsock: vsock.map(parse_vsock).transpose()?,
    };
    Ok((dir, options, p.bool("resume")?.unwrap_or(false)))
}

/// Binds the API socket and starts the server thread; the VMM's control loop receives its calls.
fn start_api(
    spec: &str,
) -> Result<
    (
        std::sync::mpsc::Receiver<api::server::ApiCall>,
        vmm_sys_util::eventfd::EventFd,
    ),
    String,
> {
    let spec = api::server::parse_api_socket(spec)?;
    let listener =
        api::server::bind(&spec).map_err(|e| format!("cannot listen on the API socket: {e}"))?;
    let wake = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| format!("cannot create the API eventfd: {e}"))?;
    let server_wake = wake
        .try_clone()
        .map_err(|e| format!("cannot create the API eventfd: {e}"))?;
    let (calls, receiver) = std::sync::mpsc::channel();
    api::server::start(listener, calls, server_wake)
        .map_err(|e| format!("cannot start the API server: {e}"))?;
    Ok((receiver, wake))
}

/// The VMM process's main function; `args` includes the program name.
pub fn main_with_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let start_ns = event_monitor::monotonic_ns();
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are not failures; a real parse error is reported on one line.
            if !e.use_stderr() {
                let text = e.render().to_string();
                print!("{text}");
                if !text.ends_with('\n') {
                    println!();
                }
                return ExitCode::SUCCESS;
            }
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "trenv: error: {} (see trenv --help)",
                first.trim_start_matches("error: ")
            );
            return ExitCode::FAILURE;
        }
    };
    match run(cli, start_ns) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("trenv: error: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_takes_serial_and_vsock_overrides() {
        let (dir, options, resume) = restore_from_cli(
            "source_url=file:///t/a,resume=on",
            Some("file=/tmp/out"),
            Some("cid=3,socket=/run/s/vsock.sock"),
        )
        .unwrap();
        assert_eq!(dir, PathBuf::from("/t/a"));
        assert!(resume);
        assert_eq!(options.serial.unwrap().mode, ConsoleMode::File);
        let vsock = options.vsock.unwrap();
        assert_eq!((vsock.cid, vsock.id), (3, None));
        assert_eq!(vsock.socket, PathBuf::from("/run/s/vsock.sock"));
        let (_, plain, resume) = restore_from_cli("source_url=/t/a", None, None).unwrap();
        assert!(plain.vsock.is_none() && plain.serial.is_none() && !resume);
        assert!(restore_from_cli("source_url=/t/a", None, Some("socket=/x")).is_err());
    }

    #[test]
    fn restore_refuses_device_flags_the_template_fixes() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["trenv", "--restore", "source_url=/t/a"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args)
        };
        assert!(parse(&["--vsock", "cid=3,socket=/x", "--serial", "tty"]).is_ok());
        for flag in [
            &["--disk", "path=/d"][..],
            &["--memory", "size=1G"],
            &["--cpus", "boot=2"],
            &["--net", "tap=t0"],
            &["--kernel", "/k"],
        ] {
            assert!(parse(flag).is_err(), "{flag:?}");
        }
    }
}
