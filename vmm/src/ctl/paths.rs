//! Where trenvctl keeps things: the run directory (one sub-directory per running VM: API socket, console
//! socket, log, pid file, runtime metadata) and the state directory (defined VMs' configs).

use std::path::{Path, PathBuf};

use super::CtlError;

/// Longest VM name: keeps socket paths well inside `sun_path` under the default run dir.
pub const MAX_NAME_LEN: usize = 64;
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Rejects names that could escape their directory or confuse tools: empty, too long, `.`/`..`-like,
/// slashes, NULs, control characters, or a leading `-` (it would read as an option).
pub fn validate_name(name: &str) -> Result<(), CtlError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("it is longer than 64 bytes")
    } else if name.chars().all(|c| c == '.') {
        Some("it is made of dots only")
    } else if name.contains('/') {
        Some("it contains '/'")
    } else if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        Some("it contains whitespace or control characters")
    } else if name.starts_with('-') {
        Some("it starts with '-'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(CtlError::BadName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// The run and state directories in use.
#[derive(Debug, Clone)]
pub struct Dirs {
    pub run: PathBuf,
    pub state: PathBuf,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl Dirs {
    /// Flags first, then TRENV_RUN_DIR / TRENV_STATE_DIR, then defaults: /run/trenv and /var/lib/trenv for
    /// root, the XDG runtime and state directories (or /tmp and ~/.local/state) for other users.
    pub fn resolve(run: Option<PathBuf>, state: Option<PathBuf>) -> Dirs {
        let env = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let run = run.or_else(|| env("TRENV_RUN_DIR")).unwrap_or_else(|| {
            if is_root() {
                PathBuf::from("/run/trenv")
            } else if let Some(xdg) = env("XDG_RUNTIME_DIR") {
                xdg.join("trenv")
            } else {
                // SAFETY: getuid has no preconditions.
                PathBuf::from(format!("/tmp/trenv-{}", unsafe { libc::getuid() }))
            }
        });
        let state = state.or_else(|| env("TRENV_STATE_DIR")).unwrap_or_else(|| {
            if is_root() {
                PathBuf::from("/var/lib/trenv")
            } else if let Some(xdg) = env("XDG_STATE_HOME") {
                xdg.join("trenv")
            } else if let Some(home) = env("HOME") {
                home.join(".local/state/trenv")
            } else {
                PathBuf::from(".trenv-state")
            }
        });
        Dirs { run, state }
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.state.join("vms")
    }

    pub fn definition(&self, name: &str) -> PathBuf {
        self.vms_dir().join(format!("{name}.json"))
    }

    pub fn vm(&self, name: &str) -> VmPaths {
        VmPaths::new(&self.run.join(name))
    }
}

/// The files of one running VM under the run directory.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
    pub api_socket: PathBuf,
    pub console_socket: PathBuf,
    pub log: PathBuf,
    pub pid: PathBuf,
    /// Runtime metadata written by `start`: name, persistence, start time, the config as sent.
    pub meta: PathBuf,
}

impl VmPaths {
    fn new(dir: &Path) -> VmPaths {
        VmPaths {
            dir: dir.to_path_buf(),
            api_socket: dir.join("api.sock"),
            console_socket: dir.join("console.sock"),
            log: dir.join("trenv.log"),
            pid: dir.join("trenv.pid"),
            meta: dir.join("domain.json"),
        }
    }

    /// Sockets must fit in `sun_path`; say so up front instead of failing inside the VMM.
    pub fn check_socket_lengths(&self) -> Result<(), CtlError> {
        for path in [&self.api_socket, &self.console_socket] {
            if path.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(CtlError::SocketPathTooLong(path.clone()));
            }
        }
        Ok(())
    }
}

/// The `trenv` binary: `--trenv`, then env TRENV_BIN, then the `trenv` next to this executable, then PATH.
pub fn trenv_binary(flag: Option<PathBuf>) -> PathBuf {
    if let Some(path) = flag {
        return path;
    }
    if let Some(path) = std::env::var_os("TRENV_BIN").filter(|v| !v.is_empty()) {
        return PathBuf::from(path);
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            let sibling = dir.join("trenv");
            if sibling.is_file() {
                return sibling;
            }
        }
    }
    PathBuf::from("trenv")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["web1", "a", "my-vm_2.test", "x".repeat(64).as_str(), "vm.."] {
            validate_name(good).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "...",
            "a/b",
            "/etc",
            "-rf",
            "has space",
            "tab\t",
            "nul\0",
            "y".repeat(65).as_str(),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn layout() {
        let dirs = Dirs::resolve(Some("/r".into()), Some("/s".into()));
        assert_eq!(dirs.definition("vm1"), PathBuf::from("/s/vms/vm1.json"));
        let vm = dirs.vm("vm1");
        assert_eq!(vm.api_socket, PathBuf::from("/r/vm1/api.sock"));
        assert_eq!(vm.console_socket, PathBuf::from("/r/vm1/console.sock"));
        assert_eq!(vm.log, PathBuf::from("/r/vm1/trenv.log"));
        vm.check_socket_lengths().unwrap();
        let deep = Dirs::resolve(Some(PathBuf::from("/x".repeat(60))), None);
        assert!(matches!(
            deep.vm("vm").check_socket_lengths(),
            Err(CtlError::SocketPathTooLong(_))
        ));
    }

    #[test]
    fn explicit_trenv_binary_wins() {
        assert_eq!(
            trenv_binary(Some("/opt/trenv".into())),
            PathBuf::from("/opt/trenv")
        );
    }
}
