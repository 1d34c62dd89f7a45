//! The OpenAPI document and the code describe the same API: the same routes, the same request bodies, and
//! schemas whose properties the models understand with the documented types.

use std::collections::BTreeSet;

use api::models::*;
use api::router::{routes, BodyKind};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Map, Value};

fn document() -> Value {
    serde_yaml_ng::from_str(api::openapi::DOCUMENT).expect("trenv.yaml is valid YAML")
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["components"]["schemas"]
        .get(name)
        .unwrap_or_else(|| panic!("no schema {name}"))
}

fn ref_name(v: &Value) -> Option<&str> {
    v.get("$ref")?
        .as_str()?
        .strip_prefix("#/components/schemas/")
}

#[test]
fn is_an_openapi_3_document_for_api_v1() {
    let doc = document();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert_eq!(doc["servers"][0]["url"], "http://localhost/api/v1");
    assert_eq!(
        doc["info"]["x-cloud-hypervisor-version"],
        api::CH_COMPAT_VERSION
    );
}

#[test]
fn routes_and_document_paths_are_the_same_set() {
    let doc = document();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let routed: BTreeSet<(String, String)> = routes()
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    assert_eq!(documented, routed);
}

#[test]
fn request_bodies_match_the_route_table() {
    let doc = document();
    for r in routes() {
        let op = &doc["paths"][r.path][r.method.to_lowercase()];
        let body = &op["requestBody"];
        match r.body {
            BodyKind::None => assert!(body.is_null(), "{} takes no body", r.path),
            BodyKind::Json(name) => {
                assert_eq!(body["required"], true, "{}", r.path);
                let s = &body["content"]["application/json"]["schema"];
                assert_eq!(ref_name(s), Some(name), "{}", r.path);
            }
        }
        assert!(
            op["responses"].as_object().is_some_and(|m| !m.is_empty()),
            "{} has responses",
            r.path
        );
    }
}

#[test]
fn every_reference_resolves() {
    fn walk(doc: &Value, v: &Value) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    let mut node = doc;
                    for part in r.trim_start_matches("#/").split('/') {
                        node = &node[part];
                    }
                    assert!(!node.is_null(), "dangling $ref {r}");
                }
                m.values().for_each(|x| walk(doc, x));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(doc, x)),
            _ => {}
        }
    }
    let doc = document();
    walk(&doc, &doc);
}

/// A value for every property of `schema`, of the documented type, so that deserializing it exercises
/// each documented field.
fn example(doc: &Value, s: &Value, depth: usize) -> Value {
    assert!(depth < 32, "schema recursion");
    if let Some(name) = ref_name(s) {
        return example(doc, schema(doc, name), depth + 1);
    }
    if let Some(e) = s.get("example") {
        return e.clone();
    }
    if let Some(e) = s.get("enum") {
        return e[0].clone();
    }
    match s["type"].as_str() {
        Some("object") => {
            let mut m = Map::new();
            for (k, v) in s["properties"].as_object().into_iter().flatten() {
                m.insert(k.clone(), example(doc, v, depth + 1));
            }
            if let Some(extra) = s.get("additionalProperties").filter(|v| v.is_object()) {
                m.insert("key".into(), example(doc, extra, depth + 1));
            }
            Value::Object(m)
        }
        Some("array") => json!([example(doc, &s["items"], depth + 1)]),
        Some("string") => json!("/x"),
        Some("integer") => json!(s.get("minimum").and_then(Value::as_u64).unwrap_or(3).max(3)),
        Some("boolean") => json!(true),
        other => panic!("unhandled schema type {other:?} in {s}"),
    }
}

/// Every documented property is understood by the model with the documented type, and everything the
/// model writes back is documented.
fn check_model<T: DeserializeOwned + Serialize>(name: &str) {
    let doc = document();
    let s = schema(&doc, name);
    let value = example(&doc, s, 0);
    let parsed: Parsed<T> = from_json(value.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("{name} example {value} does not parse: {e}"));
    assert!(
        parsed.ignored_fields.is_empty(),
        "{name}: documented but not modelled: {:?}",
        parsed.ignored_fields
    );
    fn undocumented(doc: &Value, s: &Value, v: &Value, at: &str, out: &mut Vec<String>) {
        let s = match ref_name(s) {
            Some(n) => schema(doc, n),
            None => s,
        };
        match v {
            Value::Object(m) if s.get("properties").is_some() => {
                for (k, x) in m {
                    match s["properties"].get(k) {
                        Some(sub) => undocumented(doc, sub, x, &format!("{at}.{k}"), out),
                        None => out.push(format!("{at}.{k}")),
                    }
                }
            }
            Value::Array(a) => {
                for x in a {
                    undocumented(doc, &s["items"], x, at, out);
                }
            }
            _ => {}
        }
    }
    let written = serde_json::to_value(&parsed.value).unwrap();
    let mut missing = Vec::new();
    undocumented(&doc, s, &written, name, &mut missing);
    assert!(
        missing.is_empty(),
        "modelled but not documented: {missing:?}"
    );
}

#[test]
fn schemas_match_the_models() {
    check_model::<VmConfig>("VmConfig");
    check_model::<VmInfo>("VmInfo");
    check_model::<VmmPingResponse>("VmmPingResponse");
    check_model::<PciDeviceInfo>("PciDeviceInfo");
    check_model::<VmCounters>("VmCounters");
    check_model::<DiskConfig>("DiskConfig");
    check_model::<NetConfig>("NetConfig");
    check_model::<FsConfig>("FsConfig");
    check_model::<PmemConfig>("PmemConfig");
    check_model::<VsockConfig>("VsockConfig");
    check_model::<DeviceConfig>("DeviceConfig");
    check_model::<UserDeviceConfig>("UserDeviceConfig");
    check_model::<VdpaConfig>("VdpaConfig");
    check_model::<VmResize>("VmResize");
    check_model::<VmResizeZone>("VmResizeZone");
    check_model::<VmResizeDisk>("VmResizeDisk");
    check_model::<VmRemoveDevice>("VmRemoveDevice");
    check_model::<VmSnapshotConfig>("VmSnapshotConfig");
    check_model::<RestoreConfig>("RestoreConfig");
    check_model::<VmRepurposeConfig>("VmRepurposeConfig");
    check_model::<SendMigrationData>("SendMigrationData");
    check_model::<ReceiveMigrationData>("ReceiveMigrationData");
}

#[test]
fn every_route_body_schema_is_checked_against_a_model() {
    // A new route with a body must be added to `schemas_match_the_models` too.
    let checked = [
        "VmConfig",
        "DiskConfig",
        "NetConfig",
        "FsConfig",
        "PmemConfig",
        "VsockConfig",
        "DeviceConfig",
        "UserDeviceConfig",
        "VdpaConfig",
        "VmResize",
        "VmResizeZone",
        "VmResizeDisk",
        "VmRemoveDevice",
        "VmSnapshotConfig",
        "RestoreConfig",
        "VmRepurposeConfig",
        "SendMigrationData",
        "ReceiveMigrationData",
    ];
    for r in routes() {
        if let BodyKind::Json(name) = r.body {
            assert!(checked.contains(&name), "{name} is not checked");
        }
    }
}
