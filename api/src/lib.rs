//! TrEnv's control API: Cloud Hypervisor's REST API (same paths, JSON shapes, status codes and error
//! bodies) over HTTP/1.1 on a Unix socket.
//!
//! - [`models`]: the JSON types (`VmConfig` and the request/reply bodies).
//! - [`router`]: method + path + body -> typed [`router::ApiRequest`]; the typed [`router::ApiResponse`].
//! - [`server`]: the socket server thread that hands requests to the VMM.
//! - [`client`]: a ch-remote-style client.
//! - [`openapi`]: the OpenAPI 3 document describing all of it.

pub mod client;
mod http;
pub mod models;
pub mod openapi;
pub mod router;
mod scm;
pub mod server;

/// Path prefix of every route: `/api/v1`.
pub const CH_API_VERSION: &str = "v1";
/// The Cloud Hypervisor release whose API this crate implements.
pub const CH_COMPAT_VERSION: &str = "51.1.0";

pub use scm::MAX_FDS_PER_MESSAGE;
