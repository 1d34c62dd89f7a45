//! The route table: maps an HTTP method, path and body to a typed [`ApiRequest`], and the typed
//! [`ApiResponse`] the VMM answers with.
//!
//! Everything that can be decided from the request alone (route, method, body shape, config checks) is
//! decided here, so the VMM only sees well-formed requests and answers the state-dependent part.

use std::os::fd::OwnedFd;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::models::*;
use crate::CH_API_VERSION;

/// An API request as the VMM consumes it.
#[derive(Debug)]
pub enum ApiRequest {
    VmmPing,
    VmmShutdown,
    VmCreate(Box<VmConfig>),
    VmBoot,
    VmShutdown,
    VmReboot,
    VmPause,
    VmResume,
    VmDelete,
    VmPowerButton,
    VmNmi,
    VmInfo,
    VmCounters,
    VmResize(VmResize),
    VmResizeZone(VmResizeZone),
    VmResizeDisk(VmResizeDisk),
    VmAddDisk(DiskConfig),
    VmAddFs(FsConfig),
    VmAddPmem(PmemConfig),
    /// The tap fds that came with the request by SCM_RIGHTS, in order.
    VmAddNet(NetConfig, Vec<OwnedFd>),
    VmAddVsock(VsockConfig),
    VmAddDevice(DeviceConfig),
    VmAddUserDevice(UserDeviceConfig),
    VmAddVdpa(VdpaConfig),
    VmRemoveDevice(VmRemoveDevice),
    VmSnapshot(VmSnapshotConfig),
    /// The NICs' fds, in the order of `net_fds` (the router checks that their counts add up).
    VmRestore(RestoreConfig, Vec<OwnedFd>),
    VmSendMigration(SendMigrationData),
    VmReceiveMigration(ReceiveMigrationData),
    /// trenv extension: switch the VM in place to another template.
    VmRepurpose(VmRepurposeConfig),
    /// trenv extension: pause the VM and drop its private memory until the next repurpose.
    VmPark,
}

impl ApiRequest {
    /// The endpoint name (`vm.create`), for logs and error messages.
    pub fn endpoint(&self) -> &'static str {
        match self {
            ApiRequest::VmmPing => "vmm.ping",
            ApiRequest::VmmShutdown => "vmm.shutdown",
            ApiRequest::VmCreate(_) => "vm.create",
            ApiRequest::VmBoot => "vm.boot",
            ApiRequest::VmShutdown => "vm.shutdown",
            ApiRequest::VmReboot => "vm.reboot",
            ApiRequest::VmPause => "vm.pause",
            ApiRequest::VmResume => "vm.resume",
            ApiRequest::VmDelete => "vm.delete",
            ApiRequest::VmPowerButton => "vm.power-button",
            ApiRequest::VmNmi => "vm.nmi",
            ApiRequest::VmInfo => "vm.info",
            ApiRequest::VmCounters => "vm.counters",
            ApiRequest::VmResize(_) => "vm.resize",
            ApiRequest::VmResizeZone(_) => "vm.resize-zone",
            ApiRequest::VmResizeDisk(_) => "vm.resize-disk",
            ApiRequest::VmAddDisk(_) => "vm.add-disk",
            ApiRequest::VmAddFs(_) => "vm.add-fs",
            ApiRequest::VmAddPmem(_) => "vm.add-pmem",
            ApiRequest::VmAddNet(..) => "vm.add-net",
            ApiRequest::VmAddVsock(_) => "vm.add-vsock",
            ApiRequest::VmAddDevice(_) => "vm.add-device",
            ApiRequest::VmAddUserDevice(_) => "vm.add-user-device",
            ApiRequest::VmAddVdpa(_) => "vm.add-vdpa",
            ApiRequest::VmRemoveDevice(_) => "vm.remove-device",
            ApiRequest::VmSnapshot(_) => "vm.snapshot",
            ApiRequest::VmRestore(..) => "vm.restore",
            ApiRequest::VmRepurpose(_) => "vm.repurpose",
            ApiRequest::VmPark => "vm.park",
            ApiRequest::VmSendMigration(_) => "vm.send-migration",
            ApiRequest::VmReceiveMigration(_) => "vm.receive-migration",
        }
    }
}

/// What the VMM answers.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiResponse {
    /// 204 No Content.
    Empty,
    /// 200 with this JSON body.
    Json(serde_json::Value),
    /// The body is the chain as a JSON array of strings, outermost first.
    Error { status: u16, chain: Vec<String> },
}

impl ApiResponse {
    /// An error reply whose chain is `e` followed by its sources.
    pub fn error(status: u16, e: &dyn std::error::Error) -> Self {
        let mut chain = vec![e.to_string()];
        let mut source = e.source();
        while let Some(s) = source {
            chain.push(s.to_string());
            source = s.source();
        }
        ApiResponse::Error { status, chain }
    }

    /// An error reply with one message.
    pub fn message(status: u16, message: impl Into<String>) -> Self {
        ApiResponse::Error {
            status,
            chain: vec![message.into()],
        }
    }

    /// The reply for an endpoint whose feature trenv does not have yet: 501, naming what is missing,
    /// so that a client never mistakes it for success.
    pub fn not_available(feature: &str) -> Self {
        Self::message(
            501,
            format!("{feature} is not available in this version of trenv"),
        )
    }

    /// A 200 reply carrying `value` as JSON.
    pub fn json<T: Serialize>(value: &T) -> Self {
        match serde_json::to_value(value) {
            Ok(v) => ApiResponse::Json(v),
            Err(e) => Self::error(500, &e),
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            ApiResponse::Empty => 204,
            ApiResponse::Json(_) => 200,
            ApiResponse::Error { status, .. } => *status,
        }
    }

    /// The response body; `None` for 204.
    pub fn body(&self) -> Option<String> {
        match self {
            ApiResponse::Empty => None,
            ApiResponse::Json(v) => Some(v.to_string()),
            ApiResponse::Error { chain, .. } => {
                Some(serde_json::Value::from(chain.clone()).to_string())
            }
        }
    }
}

/// Whether a route takes a body, and which OpenAPI schema describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Json(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub method: &'static str,
    /// Relative to `/api/v1`, e.g. `/vm.create`.
    pub path: &'static str,
    pub body: BodyKind,
}

const fn get(path: &'static str) -> Route {
    Route {
        method: "GET",
        path,
        body: BodyKind::None,
    }
}

const fn put(path: &'static str) -> Route {
    Route {
        method: "PUT",
        path,
        body: BodyKind::None,
    }
}

const fn put_json(path: &'static str, schema: &'static str) -> Route {
    Route {
        method: "PUT",
        path,
        body: BodyKind::Json(schema),
    }
}

static ROUTES: &[Route] = &[
    get("/vmm.ping"),
    put("/vmm.shutdown"),
    get("/vm.info"),
    get("/vm.counters"),
    put_json("/vm.create", "VmConfig"),
    put("/vm.boot"),
    put("/vm.shutdown"),
    put("/vm.reboot"),
    put("/vm.pause"),
    put("/vm.resume"),
    put("/vm.delete"),
    put("/vm.power-button"),
    put("/vm.nmi"),
    put_json("/vm.resize", "VmResize"),
    put_json("/vm.resize-zone", "VmResizeZone"),
    put_json("/vm.resize-disk", "VmResizeDisk"),
    put_json("/vm.add-disk", "DiskConfig"),
    put_json("/vm.add-fs", "FsConfig"),
    put_json("/vm.add-pmem", "PmemConfig"),
    put_json("/vm.add-net", "NetConfig"),
    put_json("/vm.add-vsock", "VsockConfig"),
    put_json("/vm.add-device", "DeviceConfig"),
    put_json("/vm.add-user-device", "UserDeviceConfig"),
    put_json("/vm.add-vdpa", "VdpaConfig"),
    put_json("/vm.remove-device", "VmRemoveDevice"),
    put_json("/vm.snapshot", "VmSnapshotConfig"),
    put_json("/vm.restore", "RestoreConfig"),
    put_json("/vm.repurpose", "VmRepurposeConfig"),
    put("/vm.park"),
    put_json("/vm.send-migration", "SendMigrationData"),
    put_json("/vm.receive-migration", "ReceiveMigrationData"),
];

/// Every route the server answers.
pub fn routes() -> &'static [Route] {
    ROUTES
}

/// The prefix every route lives under: `/api/v1`.
pub fn api_prefix() -> String {
    format!("/api/{CH_API_VERSION}")
}

/// The route-relative part of a request target (`/api/v1/vm.info?x` -> `/vm.info`), if it is under the
/// API prefix.
fn relative_path(target: &str) -> Option<&str> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    let rest = path.strip_prefix("/api/")?.strip_prefix(CH_API_VERSION)?;
    rest.starts_with('/').then_some(rest)
}

/// The methods allowed on `target`, for a 405's `Allow` header; `None` if no route has this path.
pub fn allowed_methods(target: &str) -> Option<String> {
    let path = relative_path(target)?;
    let methods: Vec<&str> = ROUTES
        .iter()
        .filter(|r| r.path == path)
        .map(|r| r.method)
        .collect();
    (!methods.is_empty()).then(|| methods.join(", "))
}

/// Maps an HTTP request to an [`ApiRequest`]. `target` is the request target (`/api/v1/vm.create`).
///
/// Errors: 404 for an unknown route, 405 for a known route with another method (the server adds `Allow`
/// from [`allowed_methods`]), 400 for a body on a no-body action, a missing body, malformed JSON, a wrong
/// field type or a config that fails validation. Unknown JSON fields are accepted and logged as warnings.
pub fn route(
    method: &str,
    target: &str,
    body: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<ApiRequest, ApiResponse> {
    let not_found = || ApiResponse::message(404, format!("unknown API endpoint {target}"));
    let path = relative_path(target).ok_or_else(not_found)?;
    let route = ROUTES
        .iter()
        .find(|r| r.path == path && r.method == method)
        .ok_or_else(|| match allowed_methods(target) {
            Some(allowed) => ApiResponse::message(
                405,
                format!("{target} does not accept {method}; use {allowed}"),
            ),
            None => not_found(),
        })?;
    let endpoint = &route.path[1..];
    let body_is_empty = body.iter().all(u8::is_ascii_whitespace);
    match route.body {
        BodyKind::None if !body_is_empty => {
            return Err(ApiResponse::message(
                400,
                format!("{endpoint} takes no request body"),
            ))
        }
        BodyKind::Json(schema) if body_is_empty => {
            return Err(ApiResponse::message(
                400,
                format!("{endpoint} needs a JSON request body ({schema})"),
            ))
        }
        // serde would also read a struct from an array of its fields in order; the API has objects only.
        BodyKind::Json(schema) if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') => {
            return Err(ApiResponse::message(
                400,
                format!("{endpoint} needs a JSON object ({schema}) as its body"),
            ))
        }
        _ => {}
    }
    if !fds.is_empty() && !matches!(endpoint, "vm.add-net" | "vm.restore") {
        // Closed when dropped here: only add-net and restore take fds.
        log::warn!(
            "{endpoint}: ignoring {} file descriptor(s) passed with a request that takes none",
            fds.len()
        );
    }
    build(endpoint, body, fds)
}

fn parse<T: DeserializeOwned>(endpoint: &str, body: &[u8]) -> Result<T, ApiResponse> {
    let parsed: Parsed<T> = from_json(body).map_err(|e| ApiResponse::Error {
        status: 400,
        chain: vec![
            format!("invalid request body for {endpoint}"),
            e.to_string(),
        ],
    })?;
    for field in &parsed.ignored_fields {
        log::warn!("{endpoint}: ignoring unknown field '{field}'");
    }
    Ok(parsed.value)
}

fn invalid_config(endpoint: &str, e: &ConfigError) -> ApiResponse {
    ApiResponse::Error {
        status: 400,
        chain: vec![
            format!("invalid configuration for {endpoint}"),
            e.to_string(),
        ],
    }
}

/// Fd numbers in a body name the client's descriptors, which mean nothing (or something else) here.
fn drop_body_fds(endpoint: &str, fds: &mut Option<Vec<i32>>) {
    if fds.take().is_some() {
        log::warn!("{endpoint}: ignoring fd numbers in the body; pass fds with SCM_RIGHTS");
    }
}

fn build(endpoint: &str, body: &[u8], fds: Vec<OwnedFd>) -> Result<ApiRequest, ApiResponse> {
    let check = |r: Result<(), ConfigError>| r.map_err(|e| invalid_config(endpoint, &e));
    let request = match endpoint {
        "vmm.ping" => ApiRequest::VmmPing,
        "vmm.shutdown" => ApiRequest::VmmShutdown,
        "vm.info" => ApiRequest::VmInfo,
        "vm.counters" => ApiRequest::VmCounters,
        "vm.boot" => ApiRequest::VmBoot,
        "vm.shutdown" => ApiRequest::VmShutdown,
        "vm.reboot" => ApiRequest::VmReboot,
        "vm.pause" => ApiRequest::VmPause,
        "vm.resume" => ApiRequest::VmResume,
        "vm.delete" => ApiRequest::VmDelete,
        "vm.power-button" => ApiRequest::VmPowerButton,
        "vm.nmi" => ApiRequest::VmNmi,
        "vm.create" => {
            let mut config: VmConfig = parse(endpoint, body)?;
            for net in config.net.iter_mut().flatten() {
                drop_body_fds(endpoint, &mut net.fds);
            }
            check(config.validate())?;
            ApiRequest::VmCreate(Box::new(config))
        }
        "vm.resize" => {
            let resize: VmResize = parse(endpoint, body)?;
            if resize.desired_vcpus == Some(0) {
                return Err(ApiResponse::message(
                    400,
                    "desired_vcpus must be at least 1",
                ));
            }
            ApiRequest::VmResize(resize)
        }
        "vm.resize-zone" => ApiRequest::VmResizeZone(parse(endpoint, body)?),
        "vm.resize-disk" => ApiRequest::VmResizeDisk(parse(endpoint, body)?),
        "vm.add-disk" => {
            let disk: DiskConfig = parse(endpoint, body)?;
            check(disk.validate())?;
            ApiRequest::VmAddDisk(disk)
        }
        "vm.add-fs" => {
            let fs: FsConfig = parse(endpoint, body)?;
            check(fs.validate())?;
            ApiRequest::VmAddFs(fs)
        }
        "vm.add-pmem" => {
            let pmem: PmemConfig = parse(endpoint, body)?;
            check(pmem.validate())?;
            ApiRequest::VmAddPmem(pmem)
        }
        "vm.add-net" => {
            let mut net: NetConfig = parse(endpoint, body)?;
            drop_body_fds(endpoint, &mut net.fds);
            check(net.validate())?;
            ApiRequest::VmAddNet(net, fds)
        }
        "vm.add-vsock" => {
            let vsock: VsockConfig = parse(endpoint, body)?;
            check(vsock.validate())?;
            ApiRequest::VmAddVsock(vsock)
        }
        "vm.add-device" => ApiRequest::VmAddDevice(parse(endpoint, body)?),
        "vm.add-user-device" => ApiRequest::VmAddUserDevice(parse(endpoint, body)?),
        "vm.add-vdpa" => ApiRequest::VmAddVdpa(parse(endpoint, body)?),
        "vm.remove-device" => ApiRequest::VmRemoveDevice(parse(endpoint, body)?),
        "vm.snapshot" => ApiRequest::VmSnapshot(parse(endpoint, body)?),
        "vm.restore" => {
            let mut restore: RestoreConfig = parse(endpoint, body)?;
            let wanted: usize = restore
                .net_fds
                .iter_mut()
                .flatten()
                .map(|n| {
                    drop_body_fds(endpoint, &mut n.fds);
                    n.num_fds
                })
                .sum();
            if restore.net_fds.is_some() && wanted != fds.len() {
                return Err(ApiResponse::message(
                    400,
                    format!(
                        "net_fds announces {wanted} fd(s) but {} came with the request",
                        fds.len()
                    ),
                ));
            }
            ApiRequest::VmRestore(restore, fds)
        }
        "vm.repurpose" => ApiRequest::VmRepurpose(parse(endpoint, body)?),
        "vm.park" => ApiRequest::VmPark,
        "vm.send-migration" => ApiRequest::VmSendMigration(parse(endpoint, body)?),
        "vm.receive-migration" => ApiRequest::VmReceiveMigration(parse(endpoint, body)?),
        _ => unreachable_route(endpoint)?,
    };
    Ok(request)
}

/// The route table and `build` are kept in step by the `every_route_builds` test; should they drift, the
/// client gets a 500 rather than the server a panic.
fn unreachable_route(endpoint: &str) -> Result<ApiRequest, ApiResponse> {
    Err(ApiResponse::message(
        500,
        format!("internal error: no handler for {endpoint}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn example_body(schema: &str) -> &'static str {
        match schema {
            "VmConfig" => r#"{"payload":{"kernel":"/k"},"memory":{"size":268435456}}"#,
            "VmResize" => r#"{"desired_vcpus":2}"#,
            "VmResizeZone" => r#"{"id":"z0","desired_ram":1073741824}"#,
            "VmResizeDisk" => r#"{"id":"disk0","desired_size":1073741824}"#,
            "DiskConfig" => r#"{"path":"/d"}"#,
            "FsConfig" => r#"{"tag":"t","socket":"/s"}"#,
            "PmemConfig" => r#"{"file":"/p"}"#,
            "NetConfig" => r#"{"tap":"tap0"}"#,
            "VsockConfig" => r#"{"cid":3,"socket":"/s"}"#,
            "DeviceConfig" => r#"{"path":"/sys/bus/pci/devices/0000:01:00.0"}"#,
            "UserDeviceConfig" => r#"{"socket":"/s"}"#,
            "VdpaConfig" => r#"{"path":"/dev/vhost-vdpa-0"}"#,
            "VmRemoveDevice" => r#"{"id":"disk0"}"#,
            "VmSnapshotConfig" => r#"{"destination_url":"file:///tmp/s"}"#,
            "RestoreConfig" => r#"{"source_url":"file:///tmp/s"}"#,
            "VmRepurposeConfig" => r#"{"template":"python-fn","resume":true}"#,
            "SendMigrationData" => r#"{"destination_url":"unix:/tmp/m"}"#,
            "ReceiveMigrationData" => r#"{"receiver_url":"unix:/tmp/m"}"#,
            other => panic!("no example for {other}"),
        }
    }

    fn target(route: &Route) -> String {
        format!("/api/v1{}", route.path)
    }

    fn status(r: Result<ApiRequest, ApiResponse>) -> u16 {
        match r {
            Ok(_) => 0,
            Err(e) => e.status(),
        }
    }

    #[test]
    fn every_route_builds_its_request() {
        for r in routes() {
            let body = match r.body {
                BodyKind::None => "",
                BodyKind::Json(schema) => example_body(schema),
            };
            let request = route(r.method, &target(r), body.as_bytes(), vec![])
                .unwrap_or_else(|e| panic!("{} {}: {e:?}", r.method, r.path));
            assert_eq!(format!("/{}", request.endpoint()), r.path);
        }
    }

    #[test]
    fn routes_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for r in routes() {
            assert!(seen.insert((r.method, r.path)), "{r:?}");
            assert!(r.method == "GET" || r.method == "PUT");
        }
    }

    #[test]
    fn wrong_method_is_405_with_allow() {
        for r in routes() {
            let other = if r.method == "GET" { "PUT" } else { "GET" };
            let body = match r.body {
                BodyKind::None => "",
                BodyKind::Json(schema) => example_body(schema),
            };
            assert_eq!(
                status(route(other, &target(r), body.as_bytes(), vec![])),
                405
            );
            assert_eq!(allowed_methods(&target(r)).unwrap(), r.method);
            assert_eq!(status(route("POST", &target(r), b"", vec![])), 405);
        }
    }

    #[test]
    fn unknown_routes_are_404() {
        for t in [
            "/api/v1/vm.explode",
            "/api/v2/vm.info",
            "/vm.info",
            "/api/v1",
            "/api/v1/",
            "/api/v1vm.info",
            "",
            "*",
        ] {
            assert_eq!(status(route("GET", t, b"", vec![])), 404, "{t}");
            assert_eq!(allowed_methods(t), None);
        }
    }

    #[test]
    fn query_strings_are_ignored() {
        assert!(matches!(
            route("GET", "/api/v1/vm.info?verbose=1", b"", vec![]),
            Ok(ApiRequest::VmInfo)
        ));
    }

    #[test]
    fn bodies_on_no_body_actions_are_400() {
        for r in routes().iter().filter(|r| r.body == BodyKind::None) {
            assert_eq!(
                status(route(r.method, &target(r), b"{}", vec![])),
                400,
                "{r:?}"
            );
            // Whitespace is not a body.
            assert_eq!(status(route(r.method, &target(r), b" \r\n", vec![])), 0);
        }
    }

    #[test]
    fn missing_and_malformed_bodies_are_400() {
        for r in routes().iter().filter(|r| r.body != BodyKind::None) {
            for body in [&b""[..], b"{", b"[]", b"null", b"\xff\xfe", b"{\"a\":1}}"] {
                assert_eq!(
                    status(route(r.method, &target(r), body, vec![])),
                    400,
                    "{r:?} {body:?}"
                );
            }
        }
    }

    #[test]
    fn wrong_field_types_are_400() {
        for (path, body) in [
            ("/api/v1/vm.create", r#"{"payload":{"kernel":5}}"#),
            (
                "/api/v1/vm.create",
                r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":-1,"max_vcpus":1}}"#,
            ),
            (
                "/api/v1/vm.create",
                r#"{"payload":{"kernel":"/k"},"disks":[{"path":"/d","readonly":"yes"}]}"#,
            ),
            ("/api/v1/vm.resize", r#"{"desired_ram":"1G"}"#),
            ("/api/v1/vm.resize", r#"{"desired_vcpus":0}"#),
            ("/api/v1/vm.add-net", r#"{"mac":"not a mac"}"#),
            ("/api/v1/vm.add-vsock", r#"{"cid":"3","socket":"/s"}"#),
            ("/api/v1/vm.remove-device", r#"{}"#),
            (
                "/api/v1/vm.restore",
                r#"{"source_url":"x","memory_restore_mode":"Lazy"}"#,
            ),
        ] {
            let r = route("PUT", path, body.as_bytes(), vec![]);
            let Err(ApiResponse::Error {
                status: code,
                chain,
            }) = r
            else {
                panic!("{path} {body} was accepted");
            };
            assert_eq!(code, 400, "{path} {body}");
            assert!(!chain.is_empty());
        }
    }

    #[test]
    fn invalid_configs_are_400_with_the_reason() {
        let r = route(
            "PUT",
            "/api/v1/vm.create",
            br#"{"payload":{"kernel":"/k"},"vsock":{"cid":1,"socket":"/s"}}"#,
            vec![],
        );
        let Err(ApiResponse::Error {
            status: code,
            chain,
        }) = r
        else {
            panic!("accepted");
        };
        assert_eq!(code, 400);
        assert_eq!(chain[0], "invalid configuration for vm.create");
        assert!(chain[1].contains("cid 1"), "{chain:?}");
        assert_eq!(
            status(route("PUT", "/api/v1/vm.create", br#"{}"#, vec![])),
            400
        );
    }

    #[test]
    fn unknown_fields_are_accepted() {
        let r = route(
            "PUT",
            "/api/v1/vm.create",
            br#"{"payload":{"kernel":"/k","igvm":"/i"},"landlock_enable":true,
                "cpus":{"boot_vcpus":1,"max_vcpus":1,"nested":true}}"#,
            vec![],
        );
        assert!(matches!(r, Ok(ApiRequest::VmCreate(_))));
        assert!(route(
            "PUT",
            "/api/v1/vm.add-disk",
            br#"{"path":"/d","sparse":false,"image_type":"Raw"}"#,
            vec![]
        )
        .is_ok());
    }

    #[test]
    fn fds_reach_add_net_and_body_fd_numbers_are_dropped() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let raw = a.as_raw_fd();
        let r = route(
            "PUT",
            "/api/v1/vm.add-net",
            br#"{"id":"net1","fds":[0,1]}"#,
            vec![a.into(), b.into()],
        );
        let Ok(ApiRequest::VmAddNet(net, fds)) = r else {
            panic!("{r:?}");
        };
        assert_eq!(net.fds, None);
        assert_eq!(net.id.as_deref(), Some("net1"));
        assert_eq!(fds.len(), 2);
        assert_eq!(fds[0].as_raw_fd(), raw);
    }

    #[test]
    fn restore_fd_counts_must_match() {
        let fd = || -> OwnedFd { std::fs::File::open("/dev/null").unwrap().into() };
        let body = br#"{"source_url":"file:///s","net_fds":[{"id":"n0","num_fds":2}]}"#;
        assert_eq!(
            status(route("PUT", "/api/v1/vm.restore", body, vec![fd()])),
            400
        );
        let r = route("PUT", "/api/v1/vm.restore", body, vec![fd(), fd()]);
        assert!(matches!(r, Ok(ApiRequest::VmRestore(_, ref f)) if f.len() == 2));
    }

    #[test]
    fn error_responses() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        let r = ApiResponse::error(500, &e);
        assert_eq!(r.body().unwrap(), r#"["outer","inner"]"#);
        assert_eq!(r.status(), 500);
        let r = ApiResponse::not_available("vm.snapshot");
        assert_eq!(r.status(), 501);
        assert!(r.body().unwrap().contains("vm.snapshot"));
        assert_eq!(ApiResponse::Empty.body(), None);
        let r = ApiResponse::json(&PciDeviceInfo::new("d", 0, 0, 5, 0));
        assert_eq!(r.status(), 200);
        assert_eq!(r.body().unwrap(), r#"{"bdf":"0000:00:05.0","id":"d"}"#);
    }
}
