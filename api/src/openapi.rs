//! The OpenAPI 3 document for the API (`api/openapi/trenv.yaml`), embedded so that tools and `--help`
//! texts can print it.

/// The document's YAML text.
pub const DOCUMENT: &str = include_str!("../openapi/trenv.yaml");
