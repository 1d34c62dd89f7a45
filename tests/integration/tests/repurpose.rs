//! Repurposing a warm VM in place (`PUT vm.repurpose`, `trenvctl repurpose`): the same VMM process, KVM VM
//! and vCPU threads switch to another function's template, and nothing of the previous tenant survives.

use std::time::Duration;

use api::client::ApiClient;
use integration::{field, make_serve_template, require_kvm, ServeTemplate, VmmProcess};

const TRENV: &str = env!("CARGO_BIN_EXE_trenv");
const TIMEOUT: Duration = Duration::from_secs(30);

fn restored_lines(vmm: &VmmProcess) -> Vec<String> {
    vmm.stdout()
        .lines()
        .filter(|l| l.starts_with("serve: restored"))
        .map(str::to_string)
        .collect()
}

fn wait_restored(vmm: &VmmProcess, n: usize) -> String {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let lines = restored_lines(vmm);
        if lines.len() >= n {
            return lines[n - 1].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no restored line #{n}:\n{}\n{}",
            vmm.stdout(),
            vmm.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A VMM serving its API on `socket`, restored with `--restore <restore>`, its console on stdout.
fn spawn_restored(socket: &std::path::Path, restore: &str) -> VmmProcess {
    VmmProcess::spawn(
        TRENV,
        &[
            "--api-socket",
            socket.to_str().unwrap(),
            "--restore",
            restore,
            "--serial",
            "tty",
        ],
    )
}

/// The tenant runs `template`'s state: its heap, the template's first word (not the previous tenant's
/// write), and a fresh instance counter.
fn check_tenant(line: &str, template: &ServeTemplate) {
    assert_eq!(field(line, "heap"), "ok", "{line}");
    assert_eq!(field(line, "checksum"), template.checksum, "{line}");
    let first = test_guest::pattern::word(template.seed, template.base);
    assert_eq!(
        field(line, "first_before"),
        format!("{first:#018x}"),
        "{line}"
    );
    assert_eq!(field(line, "instance"), "1", "{line}");
}

#[test]
fn repurposed_vm_runs_the_new_template_and_keeps_nothing_of_the_old_tenant() {
    require_kvm();
    let dir = std::env::temp_dir().join(format!("trenv-repurpose-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let a = make_serve_template(TRENV, &dir, "a", 11, "128M");
    let b = make_serve_template(TRENV, &dir, "b", 22, "128M");
    let other_size = make_serve_template(TRENV, &dir, "big", 33, "192M");

    let socket = dir.join("warm.sock");
    let restore = format!("source_url=file://{},resume=on", a.dir.display());
    let mut vmm = spawn_restored(&socket, &restore);
    check_tenant(&wait_restored(&vmm, 1), &a);
    let pid = vmm.pid();
    let client = ApiClient::new(&socket);
    client.wait_until_ready(TIMEOUT).unwrap();

    let mut generations = Vec::new();
    for (n, template) in [(2, &b), (3, &a), (4, &b)] {
        let body = serde_json::json!({"template": format!("file://{}", template.dir.display()), "resume": true});
        let (status, reply) = client
            .request("PUT", "vm.repurpose", Some(&body.to_string()), &[])
            .unwrap();
        assert_eq!(status, 200, "{reply}");
        assert!(reply.contains("\"in_place\":true"), "{reply}");
        let line = wait_restored(&vmm, n);
        check_tenant(&line, template);
        generations.push(field(&line, "generation").to_string());
    }
    generations.sort();
    generations.dedup();
    assert_eq!(
        generations.len(),
        3,
        "each tenant must get a new generation ID"
    );
    let (_, info) = client.request("GET", "vm.info", None, &[]).unwrap();
    assert!(info.contains("\"Running\""), "{info}");

    // An idle sandbox can be parked: its guest memory goes back to the host, it cannot resume, and the
    // next repurpose brings a tenant back.
    let (status, reply) = client.request("PUT", "vm.park", None, &[]).unwrap();
    assert_eq!(status, 200, "{reply}");
    let parked: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert!(parked["dropped_kib"].as_u64().unwrap() >= 1024, "{reply}");
    let (status, _) = client.request("PUT", "vm.resume", None, &[]).unwrap();
    assert_eq!(status, 500, "a parked VM must not resume");
    let body =
        serde_json::json!({"template": format!("file://{}", a.dir.display()), "resume": true});
    let (status, reply) = client
        .request("PUT", "vm.repurpose", Some(&body.to_string()), &[])
        .unwrap();
    assert_eq!(status, 200, "{reply}");
    check_tenant(&wait_restored(&vmm, 5), &a);

    // A template with another memory size cannot be served in place: the VMM restores it anew and says so.
    let body =
        serde_json::json!({"template": other_size.dir.display().to_string(), "resume": true});
    let (status, reply) = client
        .request("PUT", "vm.repurpose", Some(&body.to_string()), &[])
        .unwrap();
    assert_eq!(status, 200, "{reply}");
    assert!(
        reply.contains("\"in_place\":false") && reply.contains("memory layout"),
        "{reply}"
    );
    check_tenant(&wait_restored(&vmm, 6), &other_size);
    assert_eq!(vmm.pid(), pid, "the same VMM process serves every tenant");

    // Bad templates are refused without harming the running tenant.
    let body = serde_json::json!({"template": "/nonexistent/template"});
    let (status, reply) = client
        .request("PUT", "vm.repurpose", Some(&body.to_string()), &[])
        .unwrap();
    assert!(status >= 400, "{reply}");
    let (_, info) = client.request("GET", "vm.info", None, &[]).unwrap();
    assert!(info.contains("\"Running\""), "{info}");

    let _ = client.request("PUT", "vmm.shutdown", None, &[]);
    vmm.wait_exit(TIMEOUT).expect("VMM did not exit");
    let _ = std::fs::remove_dir_all(&dir);
}

/// VMs restored with anonymous memory (`copy`) or userfaultfd-served memory (`ondemand`) are repurposed in
/// place too: their old pages are moved out of guest RAM and freed, the new template's pages mapped
/// there, and each repurpose may itself ask for a mode.
#[test]
fn vms_restored_with_copy_or_ondemand_memory_are_repurposed_in_place() {
    require_kvm();
    let dir = std::env::temp_dir().join(format!("trenv-repurpose-modes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let a = make_serve_template(TRENV, &dir, "a", 44, "128M");
    let b = make_serve_template(TRENV, &dir, "b", 55, "128M");
    for mode in ["copy", "ondemand"] {
        let socket = dir.join(format!("{mode}.sock"));
        let restore = format!(
            "source_url=file://{},memory_restore_mode={mode},resume=on",
            a.dir.display()
        );
        let mut vmm = spawn_restored(&socket, &restore);
        check_tenant(&wait_restored(&vmm, 1), &a);
        let client = ApiClient::new(&socket);
        client.wait_until_ready(TIMEOUT).unwrap();
        // Into a cow mapping, then into anonymous memory filled from the image, then back.
        for (n, template, repurpose_mode) in [(2, &b, "cow"), (3, &a, "copy"), (4, &b, "cow")] {
            let body = serde_json::json!({
                "template": format!("file://{}", template.dir.display()),
                "memory_restore_mode": repurpose_mode,
                "resume": true,
            });
            let (status, reply) = client
                .request("PUT", "vm.repurpose", Some(&body.to_string()), &[])
                .unwrap();
            assert_eq!(status, 200, "{mode} -> {repurpose_mode}: {reply}");
            assert!(reply.contains("\"in_place\":true"), "{reply}");
            check_tenant(&wait_restored(&vmm, n), template);
        }
        let _ = client.request("PUT", "vmm.shutdown", None, &[]);
        vmm.wait_exit(TIMEOUT).expect("VMM did not exit");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
