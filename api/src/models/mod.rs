//! The JSON models of the API, with Cloud Hypervisor's exact shapes (field names, enum spellings, defaults).
//!
//! Fields Cloud Hypervisor defines and clients commonly send are modelled even when trenv does not act on
//! them, so that a config round-trips through `vm.info`; the VMM refuses non-default values it cannot honour.
//! Fields that are not modelled at all are accepted and reported by [`from_json`], so the VMM can log them:
//! a newer client must not be refused over a field we would ignore anyway. A known field of the wrong type
//! is an error.

mod devices;
mod requests;
mod vm_config;

pub use devices::*;
pub use requests::*;
pub use vm_config::*;

use serde::de::DeserializeOwned;

/// A deserialized body plus the paths of the fields that were not understood (e.g. `disks.0.sparse`).
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed<T> {
    pub value: T,
    pub ignored_fields: Vec<String>,
}

/// Parses one JSON document, collecting unknown fields instead of refusing them. Trailing data after the
/// document is an error, as is any type mismatch in a known field.
pub fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<Parsed<T>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let mut ignored_fields = Vec::new();
    let value = serde_ignored::deserialize(&mut de, |path| {
        // serde_ignored marks `Some` with a `?` segment; users know the field as `disks.0.x`.
        let path = path.to_string();
        let segments: Vec<&str> = path.split('.').filter(|s| *s != "?").collect();
        ignored_fields.push(segments.join("."));
    })?;
    de.end()?;
    Ok(Parsed {
        value,
        ignored_fields,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_reported_with_their_path() {
        let json = br#"{"payload":{"kernel":"/k","igvm":"/x"},
            "disks":[{"path":"/d","sparse":true}],"landlock_enable":false}"#;
        let parsed: Parsed<VmConfig> = from_json(json).unwrap();
        assert_eq!(
            parsed.ignored_fields,
            vec!["payload.igvm", "disks.0.sparse", "landlock_enable"]
        );
        assert_eq!(parsed.value.disks.unwrap()[0].path, Some("/d".into()));
    }

    #[test]
    fn wrong_types_and_trailing_data_are_errors() {
        assert!(from_json::<VmConfig>(br#"{"memory":{"size":"big"}}"#).is_err());
        assert!(from_json::<VmConfig>(br#"{"disks":{"path":"/d"}}"#).is_err());
        assert!(from_json::<VmConfig>(br#"{} {}"#).is_err());
        assert!(from_json::<VmConfig>(br#"{"cpus":{"boot_vcpus":256,"max_vcpus":256}}"#).is_err());
        assert!(from_json::<VmConfig>(b"").is_err());
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let mut json = String::from(r#"{"payload":{"kernel":"/k"},"x":"#);
        json.push_str(&"[".repeat(100_000));
        assert!(from_json::<VmConfig>(json.as_bytes()).is_err());
    }
}
