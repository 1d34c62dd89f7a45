//! `trenvctl`: a virsh-like CLI for a host with many trenv VMs, with no daemon.
//!
//! Each running VM is a detached `trenv --api-socket <run-dir>/<name>/api.sock` process; its serial console
//! is served on `<run-dir>/<name>/console.sock`, its output logged to `<run-dir>/<name>/trenv.log`, its pid
//! kept in `<run-dir>/<name>/trenv.pid`. Defined VMs persist as `<state-dir>/vms/<name>.json`. Every
//! command works from those files alone, so any number of trenvctl invocations may run side by side; a run
//! dir whose process has gone is reported as shut off and removed. Memory templates (`template ...`,
//! `start --template`) live in a template store: see `template`.

pub mod console;
pub mod instance;
pub mod paths;
pub mod store;
pub mod template;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use instance::Liveness;
use paths::{validate_name, Dirs};

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    Usage(String),
    #[error("invalid VM name '{name}': {reason}")]
    BadName { name: String, reason: &'static str },
    #[error(
        "socket path {0} is longer than a Unix socket address allows; use a shorter --run-dir"
    )]
    SocketPathTooLong(PathBuf),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("invalid VM config {path}: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    #[error("domain '{0}' is not defined")]
    NotDefined(String),
    #[error("domain '{0}' is neither running nor defined")]
    NotFound(String),
    #[error("domain '{0}' is not running")]
    NotRunning(String),
    #[error("domain '{0}' is already running")]
    AlreadyRunning(String),
    #[error("cannot run {binary}: {source} (pass --trenv PATH or set TRENV_BIN)")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("the VMM of '{name}' exited ({status}) during start: {log}")]
    VmmExited {
        name: String,
        status: String,
        log: String,
    },
    #[error("'{name}': timed out waiting for {what}")]
    Timeout { name: String, what: String },
    #[error("'{name}': {endpoint} failed (HTTP {status}): {message}")]
    Api {
        name: String,
        endpoint: String,
        status: u16,
        message: String,
    },
    #[error("'{name}': {endpoint}: {message}")]
    Client {
        name: String,
        endpoint: String,
        message: String,
    },
    #[error("console of '{name}': {message}")]
    Console { name: String, message: String },
    #[error("path {0} cannot be passed to trenv (it must be absolute UTF-8 without ',' or surrounding spaces)")]
    UnusablePath(PathBuf),
    #[error("template store {}", root.display())]
    Store {
        root: PathBuf,
        #[source]
        source: memory_template::StoreError,
    },
    #[error("template '{name}'")]
    Template {
        name: String,
        #[source]
        source: memory_template::StoreError,
    },
    #[error("template '{name}' ({digest}) is in use by {users}; stop them first or pass --force")]
    TemplateInUse {
        name: String,
        digest: String,
        users: String,
    },
    #[error("domain '{name}' is {state}: only a running or paused VM can become a template")]
    NotSnapshottable { name: String, state: String },
}

#[derive(Parser, Debug)]
#[command(
    name = "trenvctl",
    version,
    about = "Manage trenv VMs on this host (virsh-like, no daemon)"
)]
struct Cli {
    /// Directory of running VMs' sockets, logs and pid files [env: TRENV_RUN_DIR] [default: /run/trenv]
    #[arg(long, global = true, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// Directory of defined VMs [env: TRENV_STATE_DIR] [default: /var/lib/trenv]
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The trenv binary [env: TRENV_BIN] [default: trenv next to trenvctl, else PATH]
    #[arg(long, global = true, value_name = "PATH")]
    trenv: Option<PathBuf>,
    /// Template store [env: TRENV_STORE_DIR] [default: /var/lib/trenv/templates]
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Print JSON instead of tables, for scripts
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List running VMs (with --all, defined ones too)
    List {
        #[arg(long)]
        all: bool,
    },
    /// Define a VM from a JSON file: {"name", "config": VmConfig} or a bare VmConfig
    Define {
        file: PathBuf,
        /// Name (default: the file's "name", else its stem)
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove a VM's definition (a running VM keeps running, as a transient one)
    Undefine { name: String },
    /// Start a defined VM; with --template, restore one from a template instead of booting it
    Start {
        /// The VM: a defined one, or with --template any new name (a transient VM)
        #[arg(required_unless_present = "vm_name")]
        name: Option<String>,
        /// Restore from this template (name or digest) of the store
        #[arg(long, value_name = "TEMPLATE")]
        template: Option<String>,
        /// The VM's name, for a transient VM restored with --template (instead of NAME)
        #[arg(
            long = "name",
            value_name = "VM",
            requires = "template",
            conflicts_with = "name"
        )]
        vm_name: Option<String>,
        /// How guest RAM is restored: cow (shared, copy-on-write), copy, ondemand
        #[arg(long, requires = "template", default_value = "cow", value_parser = parse_mode)]
        mode: memory_template::RestoreMode,
        /// Leave the restored VM paused (attach its console, then `trenvctl resume`)
        #[arg(long, requires = "template")]
        paused: bool,
    },
    /// Start a VM from a JSON file without defining it
    Create {
        file: PathBuf,
        #[arg(long)]
        name: Option<String>,
    },
    /// Shut a VM down and stop its VMM
    Shutdown { name: String },
    /// Kill a VM's VMM at once
    Destroy { name: String },
    /// Reboot a VM
    Reboot { name: String },
    /// Pause a VM
    Suspend { name: String },
    /// Resume a paused VM
    Resume { name: String },
    /// Switch a running VM in place to another template (a warm sandbox for a new function)
    Repurpose {
        name: String,
        template: String,
        /// cow (default) or copy
        #[arg(long, default_value = "cow")]
        mode: String,
        /// Leave the VM paused afterwards
        #[arg(long)]
        paused: bool,
    },
    /// Show a VM's state, vCPUs, memory, pid, sockets and uptime
    Dominfo { name: String },
    /// Show a VM's state
    Domstate { name: String },
    /// Attach to a VM's serial console (Ctrl+] detaches)
    Console { name: String },
    /// Memory templates: create one from a running VM, list, inspect, verify, remove
    #[command(subcommand)]
    Template(template::TemplateCmd),
}

fn parse_mode(raw: &str) -> Result<memory_template::RestoreMode, String> {
    raw.parse()
        .map_err(|_| format!("'{raw}': expected cow, copy or ondemand"))
}

struct Ctx {
    dirs: Dirs,
    trenv: Option<PathBuf>,
    /// `--store`; None means TRENV_STORE_DIR or the default.
    store: Option<PathBuf>,
    json: bool,
}

/// A VM as list/dominfo show it.
#[derive(Debug, Clone)]
struct Status {
    name: String,
    state: String,
    persistent: bool,
    pid: Option<u32>,
    vcpus: Option<u64>,
    memory: Option<u64>,
    memory_actual: Option<u64>,
    uptime_s: Option<u64>,
    /// The template a running VM was restored from.
    template: Option<instance::TemplateRecord>,
}

impl Status {
    fn to_json(&self, ctx: &Ctx) -> Value {
        let running = self.pid.is_some();
        let paths = ctx.dirs.vm(&self.name);
        json!({
            "name": self.name,
            "state": self.state,
            "persistent": self.persistent,
            "pid": self.pid,
            "vcpus": self.vcpus,
            "memory": self.memory,
            "memory_actual": self.memory_actual,
            "uptime_s": self.uptime_s,
            "api_socket": running.then(|| paths.api_socket.display().to_string()),
            "console_socket": running.then(|| paths.console_socket.display().to_string()),
            "log": running.then(|| paths.log.display().to_string()),
            "template": self.template,
        })
    }
}

fn config_numbers(config: &Value) -> (Option<u64>, Option<u64>) {
    (
        config["cpus"]["boot_vcpus"].as_u64().or(Some(1)),
        config["memory"]["size"].as_u64(),
    )
}

fn note_stale(name: &str) {
    eprintln!("note: the VMM of '{name}' is gone; cleaned its run directory");
}

/// Everything known about `name`, running or not; None when it neither runs nor is defined.
fn status(ctx: &Ctx, name: &str) -> Result<Option<Status>, CtlError> {
    let def = store::load(&ctx.dirs, name)?;
    let liveness = instance::probe(&ctx.dirs, name)?;
    if liveness == Liveness::Stale {
        note_stale(name);
    }
    let paths = ctx.dirs.vm(name);
    match liveness {
        Liveness::Alive(pid) => {
            let meta = instance::read_meta(&paths);
            let (state, vcpus, memory, actual) = match instance::info(name, &paths) {
                Ok(info) => {
                    let (vcpus, memory) = config_numbers(&info["config"]);
                    (
                        instance::state_word(info["state"].as_str().unwrap_or("")).to_string(),
                        vcpus,
                        memory,
                        info["memory_actual_size"].as_u64(),
                    )
                }
                Err(e) => {
                    log::debug!("{e}");
                    let (vcpus, memory) = meta
                        .as_ref()
                        .map(|m| config_numbers(&m.config))
                        .unwrap_or((None, None));
                    ("no state".to_string(), vcpus, memory, None)
                }
            };
            Ok(Some(Status {
                name: name.to_string(),
                state,
                persistent: def.is_some(),
                pid: Some(pid),
                vcpus,
                memory,
                memory_actual: actual,
                uptime_s: meta.as_ref().map(instance::uptime_s),
                template: meta.and_then(|m| m.template),
            }))
        }
        Liveness::Starting => Ok(Some(Status {
            name: name.to_string(),
            state: "starting".into(),
            persistent: def.is_some(),
            pid: None,
            vcpus: None,
            memory: None,
            memory_actual: None,
            uptime_s: None,
            template: None,
        })),
        Liveness::Absent | Liveness::Stale => Ok(def.map(|def| {
            let (vcpus, memory) = config_numbers(&def.config);
            Status {
                name: name.to_string(),
                state: "shut off".into(),
                persistent: true,
                pid: None,
                vcpus,
                memory,
                memory_actual: None,
                uptime_s: None,
                template: None,
            }
        })),
    }
}

/// The pid of running `name`, or the right error.
fn running_pid(ctx: &Ctx, name: &str) -> Result<u32, CtlError> {
    validate_name(name)?;
    match instance::probe(&ctx.dirs, name)? {
        Liveness::Alive(pid) => Ok(pid),
        Liveness::Stale => {
            note_stale(name);
            Err(CtlError::NotRunning(name.to_string()))
        }
        Liveness::Starting | Liveness::Absent => {
            if store::load(&ctx.dirs, name)?.is_some() {
                Err(CtlError::NotRunning(name.to_string()))
            } else {
                Err(CtlError::NotFound(name.to_string()))
            }
        }
    }
}

fn mib(bytes: Option<u64>) -> String {
    bytes
        .map(|b| format!("{} MiB", b >> 20))
        .unwrap_or_else(|| "-".into())
}

fn print_table(rows: &[Vec<String>]) {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for (i, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!(" {}", line.join("   ").trim_end());
        if i == 0 {
            println!("{}", "-".repeat(widths.iter().sum::<usize>() + 3 * columns));
        }
    }
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

fn cmd_list(ctx: &Ctx, all: bool) -> Result<(), CtlError> {
    let mut names = instance::running_names(&ctx.dirs);
    if all {
        names.extend(store::names(&ctx.dirs)?);
        names.sort();
        names.dedup();
    }
    let mut vms = Vec::new();
    for name in names {
        if let Some(s) = status(ctx, &name)? {
            if all || s.pid.is_some() || s.state == "starting" {
                vms.push(s);
            }
        }
    }
    if ctx.json {
        print_json(&Value::Array(vms.iter().map(|s| s.to_json(ctx)).collect()));
        return Ok(());
    }
    let mut rows = vec![vec!["Id".to_string(), "Name".into(), "State".into()]];
    for s in &vms {
        rows.push(vec![
            s.pid.map_or("-".into(), |p| p.to_string()),
            s.name.clone(),
            s.state.clone(),
        ]);
    }
    print_table(&rows);
    Ok(())
}

fn cmd_define(ctx: &Ctx, file: &Path, name: Option<&str>) -> Result<(), CtlError> {
    let def = store::parse_definition_file(file, name)?;
    let path = store::save(&ctx.dirs, &def)?;
    if ctx.json {
        print_json(&json!({"name": def.name, "defined": path}));
    } else {
        println!("Domain '{}' defined from {}", def.name, file.display());
    }
    Ok(())
}

fn cmd_undefine(ctx: &Ctx, name: &str) -> Result<(), CtlError> {
    if !store::remove(&ctx.dirs, name)? {
        return Err(CtlError::NotDefined(name.to_string()));
    }
    if ctx.json {
        print_json(&json!({"name": name, "undefined": true}));
    } else {
        println!("Domain '{name}' has been undefined");
    }
    Ok(())
}

fn start_with(ctx: &Ctx, name: &str, config: &Value, persistent: bool) -> Result<(), CtlError> {
    let trenv = paths::trenv_binary(ctx.trenv.clone());
    let pid = instance::start(
        &ctx.dirs,
        &instance::StartRequest {
            name,
            config,
            persistent,
            trenv: &trenv,
            restore: None,
        },
    )?;
    if ctx.json {
        print_json(&json!({"name": name, "state": "running", "pid": pid}));
    } else {
        println!("Domain '{name}' started (pid {pid})");
    }
    Ok(())
}

fn cmd_start(ctx: &Ctx, name: &str) -> Result<(), CtlError> {
    let def = store::load(&ctx.dirs, name)?.ok_or_else(|| CtlError::NotDefined(name.into()))?;
    start_with(ctx, name, &def.config, true)
}

fn cmd_create(ctx: &Ctx, file: &Path, name: Option<&str>) -> Result<(), CtlError> {
    let def = store::parse_definition_file(file, name)?;
    start_with(ctx, &def.name, &def.config, false)
}

fn done(ctx: &Ctx, name: &str, state: &str, message: &str) {
    if ctx.json {
        print_json(&json!({"name": name, "state": state}));
    } else {
        println!("Domain '{name}' {message}");
    }
}

fn cmd_shutdown(ctx: &Ctx, name: &str) -> Result<(), CtlError> {
    let pid = running_pid(ctx, name)?;
    instance::shutdown(&ctx.dirs, name, pid)?;
    done(ctx, name, "shut off", "is shut down");
    Ok(())
}

fn cmd_destroy(ctx: &Ctx, name: &str) -> Result<(), CtlError> {
    let pid = running_pid(ctx, name)?;
    instance::destroy(&ctx.dirs, name, pid)?;
    done(ctx, name, "shut off", "destroyed");
    Ok(())
}

fn cmd_action(ctx: &Ctx, name: &str, endpoint: &str) -> Result<(), CtlError> {
    running_pid(ctx, name)?;
    instance::call(name, &ctx.dirs.vm(name), "PUT", endpoint, None)?;
    let (state, message) = match endpoint {
        "vm.pause" => ("paused", "suspended"),
        "vm.resume" => ("running", "resumed"),
        _ => ("running", "is being rebooted"),
    };
    done(ctx, name, state, message);
    Ok(())
}

fn cmd_dominfo(ctx: &Ctx, name: &str) -> Result<(), CtlError> {
    validate_name(name)?;
    let s = status(ctx, name)?.ok_or_else(|| CtlError::NotFound(name.into()))?;
    if ctx.json {
        print_json(&s.to_json(ctx));
        return Ok(());
    }
    let paths = ctx.dirs.vm(name);
    let running = s.pid.is_some();
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let rows = [
        ("Name", s.name.clone()),
        ("State", s.state.clone()),
        ("Persistent", if s.persistent { "yes" } else { "no" }.into()),
        ("PID", opt(s.pid.map(|p| p.to_string()))),
        ("CPU(s)", opt(s.vcpus.map(|v| v.to_string()))),
        ("Max memory", mib(s.memory)),
        ("Used memory", mib(s.memory_actual.or(s.memory))),
        (
            "API socket",
            opt(running.then(|| paths.api_socket.display().to_string())),
        ),
        (
            "Console",
            opt(running.then(|| paths.console_socket.display().to_string())),
        ),
        ("Log", opt(running.then(|| paths.log.display().to_string()))),
        ("Uptime", opt(s.uptime_s.map(|u| format!("{u} s")))),
        ("Template", opt(s.template.as_ref().map(template::describe))),
    ];
    for (k, v) in rows {
        println!("{:<15}{v}", format!("{k}:"));
    }
    Ok(())
}

fn cmd_domstate(ctx: &Ctx, name: &str) -> Result<(), CtlError> {
    validate_name(name)?;
    let s = status(ctx, name)?.ok_or_else(|| CtlError::NotFound(name.into()))?;
    if ctx.json {
        print_json(&json!({"name": name, "state": s.state}));
    } else {
        println!("{}", s.state);
    }
    Ok(())
}

fn cmd_console(ctx: &Ctx, name: &str) -> Result<(), CtlError> {
    running_pid(ctx, name)?;
    let paths = ctx.dirs.vm(name);
    if let Some(meta) = instance::read_meta(&paths) {
        if meta.config["serial"]["mode"].as_str() == Some("File") {
            return Err(CtlError::Console {
                name: name.into(),
                message: format!(
                    "its serial output goes to the file {}, not a console socket",
                    meta.config["serial"]["file"].as_str().unwrap_or("?")
                ),
            });
        }
    }
    let detached = console::attach(name, &paths.console_socket)?;
    if !detached {
        eprintln!("\r\nConsole of '{name}' closed");
    }
    Ok(())
}

fn run(cli: Cli) -> Result<(), CtlError> {
    let ctx = Ctx {
        dirs: Dirs::resolve(cli.run_dir, cli.state_dir),
        trenv: cli.trenv,
        store: cli.store,
        json: cli.json,
    };
    match &cli.command {
        Cmd::List { all } => cmd_list(&ctx, *all),
        Cmd::Define { file, name } => cmd_define(&ctx, file, name.as_deref()),
        Cmd::Undefine { name } => cmd_undefine(&ctx, name),
        Cmd::Start {
            name,
            template: Some(template),
            vm_name,
            mode,
            paused,
        } => template::cmd_start(
            &ctx,
            &template::StartFromTemplate {
                // clap guarantees exactly one of NAME and --name.
                vm: name.as_deref().or(vm_name.as_deref()).unwrap_or_default(),
                template,
                mode: *mode,
                paused: *paused,
            },
        ),
        Cmd::Start { name, .. } => match name {
            Some(name) => cmd_start(&ctx, name),
            None => Err(CtlError::BadName {
                name: String::new(),
                reason: "--name is only for start --template",
            }),
        },
        Cmd::Create { file, name } => cmd_create(&ctx, file, name.as_deref()),
        Cmd::Shutdown { name } => cmd_shutdown(&ctx, name),
        Cmd::Destroy { name } => cmd_destroy(&ctx, name),
        Cmd::Reboot { name } => cmd_action(&ctx, name, "vm.reboot"),
        Cmd::Suspend { name } => cmd_action(&ctx, name, "vm.pause"),
        Cmd::Resume { name } => cmd_action(&ctx, name, "vm.resume"),
        Cmd::Repurpose {
            name,
            template,
            mode,
            paused,
        } => {
            running_pid(&ctx, name)?;
            template::repurpose(&ctx, name, template, mode, *paused)
        }
        Cmd::Dominfo { name } => cmd_dominfo(&ctx, name),
        Cmd::Domstate { name } => cmd_domstate(&ctx, name),
        Cmd::Console { name } => cmd_console(&ctx, name),
        Cmd::Template(cmd) => template::run(&ctx, cmd),
    }
}

/// `trenvctl`'s main function; `args` includes the program name.
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
        Err(e) => {
            eprintln!("trenvctl: error: {}", crate::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let mut full = vec!["trenvctl"];
        full.extend_from_slice(args);
        Cli::try_parse_from(full).unwrap()
    }

    #[test]
    fn virsh_command_names() {
        assert!(matches!(
            parse(&["list", "--all"]).command,
            Cmd::List { all: true }
        ));
        assert!(matches!(
            parse(&["dominfo", "a"]).command,
            Cmd::Dominfo { .. }
        ));
        assert!(matches!(
            parse(&["domstate", "a"]).command,
            Cmd::Domstate { .. }
        ));
        let cli = parse(&["--json", "suspend", "a", "--run-dir", "/r"]);
        assert!(cli.json);
        assert_eq!(cli.run_dir, Some(PathBuf::from("/r")));
        assert!(Cli::try_parse_from(["trenvctl", "frobnicate"]).is_err());
    }

    #[test]
    fn template_commands_parse() {
        let cli = parse(&["template", "create", "t1", "--from-vm", "vm1", "--resume"]);
        assert!(matches!(
            cli.command,
            Cmd::Template(template::TemplateCmd::Create { resume: true, .. })
        ));
        assert!(matches!(
            parse(&["template", "rm", "t1", "--force"]).command,
            Cmd::Template(template::TemplateCmd::Rm { force: true, .. })
        ));
        let cli = parse(&["--store", "/s", "start", "i1", "--template", "t1"]);
        assert_eq!(cli.store, Some(PathBuf::from("/s")));
        match cli.command {
            Cmd::Start {
                name,
                template,
                mode,
                paused,
                ..
            } => {
                assert_eq!(name.as_deref(), Some("i1"));
                assert_eq!(template.as_deref(), Some("t1"));
                assert_eq!(mode, memory_template::RestoreMode::Cow);
                assert!(!paused);
            }
            other => panic!("{other:?}"),
        }
        match parse(&[
            "start",
            "--template",
            "t1",
            "--name",
            "i2",
            "--mode",
            "ondemand",
        ])
        .command
        {
            Cmd::Start {
                name,
                vm_name,
                mode,
                ..
            } => {
                assert_eq!((name, vm_name.as_deref()), (None, Some("i2")));
                assert_eq!(mode, memory_template::RestoreMode::OnDemand);
            }
            other => panic!("{other:?}"),
        }
        // A plain start still takes just a name; the template options need --template.
        assert!(matches!(
            parse(&["start", "vm"]).command,
            Cmd::Start { template: None, .. }
        ));
        for bad in [
            &["trenvctl", "start"][..],
            &["trenvctl", "start", "vm", "--mode", "copy"],
            &["trenvctl", "start", "--name", "x"],
            &["trenvctl", "start", "a", "--template", "t", "--name", "b"],
            &[
                "trenvctl",
                "start",
                "a",
                "--template",
                "t",
                "--mode",
                "lazy",
            ],
            &["trenvctl", "template", "create", "t1"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn commands_on_unknown_vms_fail_clearly() {
        let root = std::env::temp_dir().join(format!("trenvctl-mod-{}", std::process::id()));
        let ctx = Ctx {
            dirs: Dirs::resolve(Some(root.join("run")), Some(root.join("state"))),
            trenv: None,
            store: Some(root.join("store")),
            json: false,
        };
        assert!(matches!(
            cmd_domstate(&ctx, "ghost"),
            Err(CtlError::NotFound(_))
        ));
        assert!(matches!(
            cmd_start(&ctx, "ghost"),
            Err(CtlError::NotDefined(_))
        ));
        assert!(matches!(
            cmd_shutdown(&ctx, "ghost"),
            Err(CtlError::NotFound(_))
        ));
        assert!(matches!(
            cmd_undefine(&ctx, "ghost"),
            Err(CtlError::NotDefined(_))
        ));
        assert!(matches!(
            cmd_destroy(&ctx, "../x"),
            Err(CtlError::BadName { .. })
        ));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn config_numbers_default_to_one_vcpu() {
        assert_eq!(
            config_numbers(&json!({"memory": {"size": 1024}})),
            (Some(1), Some(1024))
        );
        assert_eq!(
            config_numbers(&json!({"cpus": {"boot_vcpus": 4}})),
            (Some(4), None)
        );
    }
}
