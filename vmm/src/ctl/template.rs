//! `trenvctl template ...` (make a template of a running VM, list, inspect, verify and remove templates)
//! and `trenvctl start --template` (a VM restored from one).
//!
//! Templates live in a `memory_template::TemplateStore` (`--store DIR`, else TRENV_STORE_DIR, else
//! /var/lib/trenv/templates). `template create` pauses the VM through its API, has the VMM snapshot it
//! into a fresh directory under the store's `staging/`, and publishes that (an atomic rename to its
//! content address, or nothing new when identical content is stored already). A restored VM is a
//! `trenv --restore ... --api-socket ...` process in the run dir like any other, so every other command
//! works on it; its VMM holds a shared lock on the template, which `template rm` respects.

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use clap::Subcommand;
use memory_template::{format, PublishedTemplate, RestoreMode, StoreError, TemplateStore};
use serde_json::{json, Value};

use super::instance::{self, Liveness, RestoreRequest, TemplateRecord};
use super::paths::{self, validate_name};
use super::{print_json, print_table, running_pid, store, CtlError, Ctx};

#[derive(Subcommand, Debug)]
pub enum TemplateCmd {
    /// Pause a running VM, snapshot it into the store as NAME (left paused unless --resume)
    Create {
        name: String,
        /// The running (or paused) VM to snapshot
        #[arg(long, value_name = "VM")]
        from_vm: String,
        /// Resume the VM once the template is published
        #[arg(long)]
        resume: bool,
    },
    /// List the store's templates
    List,
    /// Show a template's manifest: digest, creation, vCPUs, memory regions, fingerprint, config
    Inspect { name: String },
    /// Re-read and check every file of a template against its manifest
    Verify { name: String },
    /// Remove a template (refused while VMs restored from it run, unless --force)
    Rm {
        name: String,
        /// Remove even while instances use it (they keep running on their mappings)
        #[arg(long)]
        force: bool,
    },
}

/// What `trenvctl start --template` was asked for.
pub struct StartFromTemplate<'a> {
    pub vm: &'a str,
    pub template: &'a str,
    pub mode: RestoreMode,
    /// Leave the restored guest paused (attach a console first, then `trenvctl resume`).
    pub paused: bool,
}

const MIB: f64 = (1u64 << 20) as f64;

/// The store root: `--store`, else TRENV_STORE_DIR, else the default; made absolute because the VMM is
/// handed `file://` URLs under it.
fn store_root(ctx: &Ctx) -> PathBuf {
    let root = ctx
        .store
        .clone()
        .unwrap_or_else(TemplateStore::default_root);
    std::path::absolute(&root).unwrap_or(root)
}

/// Opens the store; None when it does not exist and `create` is false, so read-only commands do not
/// create directories as a side effect.
fn open_store(ctx: &Ctx, create: bool) -> Result<Option<TemplateStore>, CtlError> {
    let root = store_root(ctx);
    if !create && !root.join("objects").is_dir() {
        return Ok(None);
    }
    TemplateStore::open(&root)
        .map(Some)
        .map_err(|source| CtlError::Store { root, source })
}

fn template_err(name: &str) -> impl FnOnce(StoreError) -> CtlError + '_ {
    move |source| CtlError::Template {
        name: name.to_string(),
        source,
    }
}

/// Finds `name` (a template name or a full digest) in an existing store.
fn resolve(ctx: &Ctx, name: &str) -> Result<(TemplateStore, PublishedTemplate), CtlError> {
    let Some(store) = open_store(ctx, false)? else {
        return Err(template_err(name)(StoreError::NotFound(name.to_string())));
    };
    let t = store.resolve(name).map_err(template_err(name))?;
    Ok((store, t))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB)
}

fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

/// `unix_ms` as `YYYY-MM-DD HH:MM:SS UTC` (civil-from-days, proleptic Gregorian calendar).
fn utc_time(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Running VMs of this run dir restored from the object `digest`, sorted.
fn users_of(ctx: &Ctx, digest: &str) -> Vec<String> {
    instance::running_names(&ctx.dirs)
        .into_iter()
        .filter(|name| {
            matches!(instance::probe(&ctx.dirs, name), Ok(Liveness::Alive(_)))
                && instance::read_meta(&ctx.dirs.vm(name))
                    .and_then(|m| m.template)
                    .is_some_and(|t| t.digest == digest)
        })
        .collect()
}

pub(super) fn run(ctx: &Ctx, cmd: &TemplateCmd) -> Result<(), CtlError> {
    match cmd {
        TemplateCmd::Create {
            name,
            from_vm,
            resume,
        } => cmd_create(ctx, name, from_vm, *resume),
        TemplateCmd::List => cmd_list(ctx),
        TemplateCmd::Inspect { name } => cmd_inspect(ctx, name),
        TemplateCmd::Verify { name } => cmd_verify(ctx, name),
        TemplateCmd::Rm { name, force } => cmd_rm(ctx, name, *force),
    }
}

/// A staging directory name no other writer uses: the template name, our pid and the clock.
fn staging_name(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{name}-{:x}-{nanos:x}", std::process::id())
}

fn cmd_create(ctx: &Ctx, name: &str, vm: &str, resume: bool) -> Result<(), CtlError> {
    let started = Instant::now();
    if !memory_template::writer::valid_name(name) {
        return Err(template_err(name)(StoreError::InvalidName(name.into())));
    }
    running_pid(ctx, vm)?;
    let store = open_store(ctx, true)?.ok_or_else(|| CtlError::Store {
        root: store_root(ctx),
        source: StoreError::NotFound(name.into()),
    })?;
    let paths = ctx.dirs.vm(vm);
    let state = instance::info(vm, &paths)?["state"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let paused_by_us = match state.as_str() {
        "Running" => {
            instance::call(vm, &paths, "PUT", "vm.pause", None)?;
            true
        }
        "Paused" => false,
        other => {
            return Err(CtlError::NotSnapshottable {
                name: vm.into(),
                state: instance::state_word(other).into(),
            })
        }
    };
    let result = snapshot_and_publish(ctx, &store, name, vm);
    // A failed attempt leaves the VM as it found it; a successful one leaves it paused unless asked.
    let resume_now = if result.is_ok() { resume } else { paused_by_us };
    let resumed = if resume_now {
        match instance::call(vm, &paths, "PUT", "vm.resume", None) {
            Ok(_) => true,
            Err(e) if result.is_err() => {
                eprintln!("warning: could not resume '{vm}': {e}");
                false
            }
            Err(e) => return Err(e),
        }
    } else {
        false
    };
    let (t, previous, stored_before) = result?;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    let vm_state = if resumed { "running" } else { "paused" };
    if ctx.json {
        print_json(&json!({
            "name": name,
            "digest": t.digest,
            "dir": t.dir,
            "from_vm": vm,
            "memory_bytes": t.manifest.memory_bytes(),
            "data_bytes": t.manifest.data_bytes(),
            "elapsed_ms": elapsed_ms,
            "deduplicated": stored_before,
            "replaced": previous.as_ref().filter(|p| **p != t.digest),
            "vm_state": vm_state,
        }));
        return Ok(());
    }
    println!("Template '{name}' created from '{vm}' in {elapsed_ms:.0} ms");
    println!("  Digest:  {}", t.digest);
    println!(
        "  Memory:  {} ({} of data)",
        mib(t.manifest.memory_bytes()),
        mib(t.manifest.data_bytes())
    );
    if stored_before {
        println!("  Identical to a template already in the store: stored once");
    }
    if let Some(old) = previous.filter(|p| *p != t.digest) {
        println!("  The name used to point to {}", short(&old));
    }
    if resumed {
        println!("Domain '{vm}' resumed");
    } else {
        println!("Domain '{vm}' is left paused ('trenvctl resume {vm}' continues it)");
    }
    Ok(())
}

/// Has the VMM snapshot `vm` (paused) into the store's staging area and publishes the result as
/// `name`. Returns the template, the digest `name` pointed to before, and whether the store already
/// held identical content.
fn snapshot_and_publish(
    ctx: &Ctx,
    store: &TemplateStore,
    name: &str,
    vm: &str,
) -> Result<(PublishedTemplate, Option<String>, bool), CtlError> {
    let staged = store.staging_dir().join(staging_name(name));
    let body = json!({ "destination_url": format!("file://{}", staged.display()) });
    let snap = instance::call(
        vm,
        &ctx.dirs.vm(vm),
        "PUT",
        "vm.snapshot",
        Some(&body.to_string()),
    );
    let result = snap.and_then(|_| {
        let digest = format::read_manifest(&staged)
            .map_err(|e| template_err(name)(StoreError::Template(e)))?
            .content_digest();
        let stored_before = store.resolve(&digest).is_ok();
        let previous = store.resolve(name).ok().map(|t| t.digest);
        let t = store.publish(&staged, name).map_err(template_err(name))?;
        Ok((t, previous, stored_before))
    });
    if result.is_err() && staged.exists() {
        // Publishing consumes the staged directory; after a failure it is debris.
        let _ = std::fs::remove_dir_all(&staged);
    }
    result
}

fn cmd_list(ctx: &Ctx) -> Result<(), CtlError> {
    let list = match open_store(ctx, false)? {
        Some(store) => store.list().map_err(|source| CtlError::Store {
            root: store_root(ctx),
            source,
        })?,
        None => Vec::new(),
    };
    if ctx.json {
        let items: Vec<Value> = list
            .iter()
            .map(|s| {
                let mut v = json!(s);
                v["users"] = json!(users_of(ctx, &s.digest));
                v
            })
            .collect();
        print_json(&Value::Array(items));
        return Ok(());
    }
    let mut rows = vec![vec![
        "Name".to_string(),
        "Digest".into(),
        "Memory".into(),
        "Data".into(),
        "Created".into(),
        "In use".into(),
    ]];
    for s in &list {
        rows.push(vec![
            s.name.clone(),
            short(&s.digest).into(),
            mib(s.memory_bytes),
            mib(s.data_bytes),
            utc_time(s.created_unix_ms),
            if s.in_use { "yes" } else { "no" }.into(),
        ]);
    }
    print_table(&rows);
    Ok(())
}

fn cmd_inspect(ctx: &Ctx, name: &str) -> Result<(), CtlError> {
    let (store, t) = resolve(ctx, name)?;
    let m = &t.manifest;
    let in_use = store
        .list()
        .ok()
        .and_then(|l| l.into_iter().find(|s| s.digest == t.digest))
        .is_some_and(|s| s.in_use);
    let users = users_of(ctx, &t.digest);
    let vcpus = m.vm_config["cpus"]["boot_vcpus"].as_u64().unwrap_or(1);
    if ctx.json {
        let regions: Vec<Value> = m
            .regions
            .iter()
            .map(|r| {
                json!({
                    "guest_addr": r.guest_addr,
                    "size": r.size,
                    "file": r.file,
                    "data_pages": r.data_pages,
                    "data_mib": (r.data_pages * 4096) as f64 / MIB,
                    "digest": r.digest,
                })
            })
            .collect();
        print_json(&json!({
            "name": t.name.as_deref().unwrap_or(name),
            "digest": t.digest,
            "dir": t.dir,
            "format_version": m.format_version,
            "created_unix_ms": m.created_unix_ms,
            "created": utc_time(m.created_unix_ms),
            "trenv_version": m.trenv_version,
            "vcpus": vcpus,
            "memory_bytes": m.memory_bytes(),
            "data_bytes": m.data_bytes(),
            "regions": regions,
            "fingerprint": m.fingerprint,
            "state": m.state,
            "working_set": m.working_set,
            "extra": m.extra,
            "config": m.vm_config,
            "in_use": in_use,
            "users": users,
        }));
        return Ok(());
    }
    let f = &m.fingerprint;
    let fields = [
        ("Name", t.name.clone().unwrap_or_else(|| "-".into())),
        ("Digest", t.digest.clone()),
        ("Directory", t.dir.display().to_string()),
        ("Created", utc_time(m.created_unix_ms)),
        ("trenv version", m.trenv_version.clone()),
        ("Format", format!("v{}", m.format_version)),
        ("CPU(s)", vcpus.to_string()),
        (
            "Memory",
            format!(
                "{} in {} region(s), {} of data",
                mib(m.memory_bytes()),
                m.regions.len(),
                mib(m.data_bytes())
            ),
        ),
        (
            "State",
            format!("{} ({} bytes)", m.state.file, m.state.size),
        ),
        (
            "Working set",
            m.working_set
                .as_ref()
                .map_or("-".into(), |w| format!("{} ({} pages)", w.file, w.size / 8)),
        ),
        (
            "Fingerprint",
            format!(
                "{} {}, KVM API {}, {}-byte pages, CPUID {}",
                f.cpu_vendor,
                f.cpu_signature,
                f.kvm_api_version,
                f.host_page_size,
                short(&f.supported_cpuid_digest)
            ),
        ),
        (
            "In use",
            match (in_use, users.is_empty()) {
                (false, _) => "no".to_string(),
                (true, true) => "yes".to_string(),
                (true, false) => format!("yes ({})", users.join(", ")),
            },
        ),
    ];
    for (k, v) in fields {
        println!("{:<15}{v}", format!("{k}:"));
    }
    println!("Regions:");
    let mut rows = vec![vec![
        "#".to_string(),
        "Guest address".into(),
        "Size".into(),
        "Data".into(),
        "File".into(),
    ]];
    for (i, r) in m.regions.iter().enumerate() {
        rows.push(vec![
            i.to_string(),
            format!("{:#x}", r.guest_addr),
            mib(r.size),
            mib(r.data_pages * 4096),
            r.file.clone(),
        ]);
    }
    print_table(&rows);
    println!("Config:");
    let config = serde_json::to_string_pretty(&m.vm_config).unwrap_or_default();
    for line in config.lines() {
        println!("  {line}");
    }
    Ok(())
}

fn cmd_verify(ctx: &Ctx, name: &str) -> Result<(), CtlError> {
    let started = Instant::now();
    // Resolving checks the manifest's checksum and that its content matches the object's address.
    let (_, t) = resolve(ctx, name)?;
    format::verify_images_full(&t.dir, &t.manifest)
        .map_err(|e| template_err(name)(StoreError::Template(e)))?;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    let m = &t.manifest;
    if ctx.json {
        print_json(&json!({
            "name": name,
            "digest": t.digest,
            "ok": true,
            "regions": m.regions.len(),
            "data_bytes": m.data_bytes(),
            "elapsed_ms": elapsed_ms,
        }));
    } else {
        println!(
            "Template '{name}' ({}) is intact: manifest, state and {} region image(s) ({} of data) match, checked in {elapsed_ms:.0} ms",
            short(&t.digest),
            m.regions.len(),
            mib(m.data_bytes())
        );
    }
    Ok(())
}

fn cmd_rm(ctx: &Ctx, name: &str, force: bool) -> Result<(), CtlError> {
    let Some(store) = open_store(ctx, false)? else {
        return Err(template_err(name)(StoreError::NotFound(name.to_string())));
    };
    let users = store
        .resolve(name)
        .map(|t| users_of(ctx, &t.digest))
        .unwrap_or_default();
    match store.remove(name, force) {
        Ok(()) => {}
        Err(StoreError::InUse { name, digest }) => {
            let users = if users.is_empty() {
                "running instances".to_string()
            } else {
                users
                    .iter()
                    .map(|u| format!("'{u}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(CtlError::TemplateInUse {
                name,
                digest,
                users,
            });
        }
        Err(e) => return Err(template_err(name)(e)),
    }
    if ctx.json {
        print_json(&json!({"name": name, "removed": true, "users": users}));
    } else {
        println!("Template '{name}' removed");
        if !users.is_empty() {
            println!(
                "  Still running from it (on their own mappings): {}",
                users.join(", ")
            );
        }
    }
    Ok(())
}

/// `trenvctl start VM --template NAME`: a VMM restoring the template, in the run dir like any started VM.
pub(super) fn cmd_start(ctx: &Ctx, req: &StartFromTemplate<'_>) -> Result<(), CtlError> {
    let started = Instant::now();
    validate_name(req.vm)?;
    let persistent = store::load(&ctx.dirs, req.vm)?.is_some();
    let (_, t) = resolve(ctx, req.template)?;
    let restore = RestoreRequest {
        template: TemplateRecord {
            name: req.template.to_string(),
            digest: t.digest.clone(),
            dir: t.dir.clone(),
            mode: req.mode.to_string(),
        },
        resume: !req.paused,
    };
    let trenv = paths::trenv_binary(ctx.trenv.clone());
    let pid = instance::start(
        &ctx.dirs,
        &instance::StartRequest {
            name: req.vm,
            config: &t.manifest.vm_config,
            persistent,
            trenv: &trenv,
            restore: Some(&restore),
        },
    )?;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    let state = if req.paused { "paused" } else { "running" };
    if ctx.json {
        print_json(&json!({
            "name": req.vm,
            "state": state,
            "pid": pid,
            "template": req.template,
            "digest": t.digest,
            "mode": req.mode.to_string(),
            "elapsed_ms": elapsed_ms,
        }));
    } else {
        println!(
            "Domain '{}' restored from template '{}' ({} mode, pid {pid}) in {elapsed_ms:.0} ms{}",
            req.vm,
            req.template,
            req.mode,
            if req.paused {
                ", paused ('trenvctl resume' runs it)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// One line for `dominfo`: where a restored VM came from.
pub(super) fn describe(record: &TemplateRecord) -> String {
    format!(
        "{} ({}, {} mode)",
        record.name,
        short(&record.digest),
        record.mode
    )
}

/// `trenvctl repurpose VM TEMPLATE`: switches a running VM in place to another template (or, when its
/// layout differs, the VMM restores a new VM from it and says so).
pub(super) fn repurpose(
    ctx: &Ctx,
    vm: &str,
    template: &str,
    mode: &str,
    paused: bool,
) -> Result<(), CtlError> {
    let (_store, t) = resolve(ctx, template)?;
    let api_mode = match mode {
        "cow" => "CopyOnWrite",
        "copy" => "Copy",
        other => {
            return Err(CtlError::Usage(format!(
                "--mode {other}: repurposing supports cow or copy"
            )))
        }
    };
    let body = serde_json::json!({
        "template": format!("file://{}", t.dir.display()),
        "resume": !paused,
        "memory_restore_mode": api_mode,
    });
    let started = std::time::Instant::now();
    let reply = super::instance::call(
        vm,
        &ctx.dirs.vm(vm),
        "PUT",
        "vm.repurpose",
        Some(&body.to_string()),
    )?;
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap_or_default();
    let in_place = reply["in_place"].as_bool().unwrap_or(false);
    if ctx.json {
        super::print_json(&serde_json::json!({
            "name": vm,
            "template": template,
            "digest": t.digest,
            "in_place": in_place,
            "reason": reply["reason"],
            "ms": started.elapsed().as_secs_f64() * 1e3,
        }));
    } else if in_place {
        println!(
            "VM '{vm}' repurposed in place to template '{template}' in {:.2} ms{}",
            started.elapsed().as_secs_f64() * 1e3,
            if paused { " (paused)" } else { "" }
        );
    } else {
        println!(
            "VM '{vm}' could not be repurposed in place ({}); it was restored anew from template '{template}'",
            reply["reason"].as_str().unwrap_or("incompatible template")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_time(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_time(1_798_761_599_999), "2026-12-31 23:59:59 UTC");
        assert_eq!(utc_time(4_107_542_400_000), "2100-03-01 00:00:00 UTC");
    }

    #[test]
    fn staging_names_are_valid_and_distinct() {
        let a = staging_name("t1");
        std::thread::sleep(std::time::Duration::from_millis(1));
        let b = staging_name("t1");
        assert_ne!(a, b);
        assert!(memory_template::writer::valid_name(&a), "{a}");
        assert_eq!(short("0123456789abcdef"), "0123456789ab");
        assert_eq!(short("ab"), "ab");
    }
}
