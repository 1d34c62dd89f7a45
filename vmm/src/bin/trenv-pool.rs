//! `trenv-pool --config FILE --socket PATH [--trenv PATH] [--work-dir DIR]`: a warm pool of trenv sandboxes
//! serving `POST /invoke/{function}` on a Unix socket (see `vmm::pool`). SIGTERM or SIGINT stops it and
//! kills every sandbox; if it is killed outright, its sandboxes die with it (parent-death signal), and the
//! next pool on the same work directory removes what was left there.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use vmm::pool::{http, Pool, PoolConfig};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

#[derive(Parser)]
#[command(
    name = "trenv-pool",
    about = "Warm pool of trenv sandboxes serving function invocations"
)]
struct Args {
    /// The pool configuration (JSON).
    #[arg(long)]
    config: PathBuf,
    /// The Unix socket to serve HTTP on.
    #[arg(long)]
    socket: PathBuf,
    /// The trenv binary (default: `trenv` beside this binary).
    #[arg(long)]
    trenv: Option<PathBuf>,
    /// Where sandboxes get their directories (default: SOCKET.sandboxes). One pool at a time uses it.
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

fn run(args: Args) -> Result<(), String> {
    let config = PoolConfig::from_file(&args.config).map_err(|e| e.to_string())?;
    let trenv = match args.trenv {
        Some(t) => t,
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find this binary: {e}"))?
            .with_file_name("trenv"),
    };
    let work_dir = args.work_dir.unwrap_or_else(|| {
        let mut dir = args.socket.clone().into_os_string();
        dir.push(".sandboxes");
        PathBuf::from(dir)
    });
    // A socket left by a pool that was killed is replaced; one that a live pool answers on is not.
    if UnixStream::connect(&args.socket).is_ok() {
        return Err(format!(
            "another process serves on {}",
            args.socket.display()
        ));
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let drain = Duration::from_millis(config.invoke_timeout_ms.saturating_mul(3));
    let pool = Arc::new(
        Pool::new(config, trenv, work_dir.clone())
            .map_err(|e| format!("cannot start the pool: {e}"))?,
    );
    let _ = std::fs::remove_file(&args.socket);
    let listener = UnixListener::bind(&args.socket)
        .map_err(|e| format!("cannot listen on {}: {e}", args.socket.display()))?;
    println!("trenv-pool: serving on {}", args.socket.display());
    http::serve(pool.clone(), listener, &STOP, drain);
    drop(pool);
    let _ = std::fs::remove_file(&args.socket);
    let _ = std::fs::remove_dir(&work_dir);
    Ok(())
}

fn main() -> std::process::ExitCode {
    let _ = vmm::logger::init(0, None);
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trenv-pool: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
