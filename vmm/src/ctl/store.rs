//! Defined VMs: `<state-dir>/vms/<name>.json` holding `{"name": ..., "config": VmConfig}`.
//!
//! The config is kept as the JSON the user wrote (so fields a later trenv understands survive a round
//! trip), after checking that it parses as the API's `VmConfig`.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::paths::{validate_name, Dirs};
use super::CtlError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Definition {
    pub name: String,
    pub config: Value,
}

/// Checks that `config` is a `VmConfig` the API will take.
pub fn check_config(config: &Value, source: &Path) -> Result<(), CtlError> {
    if !config.is_object() {
        return Err(CtlError::BadConfig {
            path: source.to_path_buf(),
            reason: "expected a JSON object (a VmConfig)".into(),
        });
    }
    let parsed = api::models::from_json::<api::models::VmConfig>(config.to_string().as_bytes())
        .map_err(|e| CtlError::BadConfig {
            path: source.to_path_buf(),
            reason: e.to_string(),
        })?;
    if !parsed.ignored_fields.is_empty() {
        eprintln!(
            "warning: {}: fields trenv does not understand (kept, ignored): {}",
            source.display(),
            parsed.ignored_fields.join(", ")
        );
    }
    Ok(())
}

/// Reads a definition file: `{"name", "config"}`, or a bare VmConfig named by `name` or the file's stem.
pub fn parse_definition_file(path: &Path, name: Option<&str>) -> Result<Definition, CtlError> {
    let text = std::fs::read_to_string(path).map_err(|e| CtlError::Io {
        what: format!("cannot read {}", path.display()),
        source: e,
    })?;
    let value: Value = serde_json::from_str(&text).map_err(|e| CtlError::BadConfig {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let wrapped = value.as_object().filter(|o| {
        o.contains_key("config") && o.len() <= 2 && o.keys().all(|k| k == "name" || k == "config")
    });
    let (file_name, config) = match wrapped {
        Some(o) => {
            let file_name = match o.get("name") {
                None => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => {
                    return Err(CtlError::BadConfig {
                        path: path.to_path_buf(),
                        reason: "\"name\" must be a string".into(),
                    })
                }
            };
            (file_name, o["config"].clone())
        }
        None => (None, value),
    };
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty());
    let name = name
        .map(str::to_string)
        .or(file_name)
        .or(stem)
        .ok_or_else(|| CtlError::BadConfig {
            path: path.to_path_buf(),
            reason: "no VM name: pass --name".into(),
        })?;
    validate_name(&name)?;
    check_config(&config, path)?;
    Ok(Definition { name, config })
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers never see half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

pub fn save(dirs: &Dirs, def: &Definition) -> Result<PathBuf, CtlError> {
    let path = dirs.definition(&def.name);
    let mut text = serde_json::to_string_pretty(def).unwrap_or_default();
    text.push('\n');
    write_atomic(&path, text.as_bytes()).map_err(|e| CtlError::Io {
        what: format!("cannot write {}", path.display()),
        source: e,
    })?;
    Ok(path)
}

pub fn load(dirs: &Dirs, name: &str) -> Result<Option<Definition>, CtlError> {
    validate_name(name)?;
    let path = dirs.definition(name);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(CtlError::Io {
                what: format!("cannot read {}", path.display()),
                source: e,
            })
        }
    };
    let def: Definition = serde_json::from_str(&text).map_err(|e| CtlError::BadConfig {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    Ok(Some(def))
}

pub fn remove(dirs: &Dirs, name: &str) -> Result<bool, CtlError> {
    validate_name(name)?;
    let path = dirs.definition(name);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(CtlError::Io {
            what: format!("cannot remove {}", path.display()),
            source: e,
        }),
    }
}

/// Names of all defined VMs, sorted.
pub fn names(dirs: &Dirs) -> Result<Vec<String>, CtlError> {
    let dir = dirs.vms_dir();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(CtlError::Io {
                what: format!("cannot list {}", dir.display()),
                source: e,
            })
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".json").map(str::to_string)
        })
        .filter(|n| validate_name(n).is_ok())
        .collect();
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("trenvctl-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const CONFIG: &str = r#"{"payload":{"kernel":"/k","cmdline":"x"},"memory":{"size":268435456}}"#;

    #[test]
    fn bare_config_named_by_stem_or_flag() {
        let dir = temp_dir("bare");
        let file = dir.join("web.json");
        std::fs::write(&file, CONFIG).unwrap();
        let def = parse_definition_file(&file, None).unwrap();
        assert_eq!(def.name, "web");
        assert_eq!(def.config["memory"]["size"], 268435456);
        assert_eq!(
            parse_definition_file(&file, Some("other")).unwrap().name,
            "other"
        );
        assert!(parse_definition_file(&file, Some("../evil")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn wrapped_definition_round_trips() {
        let dir = temp_dir("wrapped");
        let file = dir.join("x.json");
        std::fs::write(&file, format!(r#"{{"name":"db","config":{CONFIG}}}"#)).unwrap();
        let def = parse_definition_file(&file, None).unwrap();
        assert_eq!(def.name, "db");
        let dirs = Dirs::resolve(Some(dir.join("run")), Some(dir.join("state")));
        save(&dirs, &def).unwrap();
        assert_eq!(load(&dirs, "db").unwrap(), Some(def));
        assert_eq!(names(&dirs).unwrap(), vec!["db".to_string()]);
        assert!(remove(&dirs, "db").unwrap());
        assert!(!remove(&dirs, "db").unwrap());
        assert_eq!(load(&dirs, "db").unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn malformed_configs_are_refused() {
        let dir = temp_dir("bad");
        let file = dir.join("bad.json");
        for text in [
            "not json",
            "[1,2]",
            r#"{"memory":{"size":"big"}}"#,
            r#"{"name":5,"config":{}}"#,
        ] {
            std::fs::write(&file, text).unwrap();
            assert!(
                parse_definition_file(&file, None).is_err(),
                "{text} accepted"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
