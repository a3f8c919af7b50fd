//! The ringfeed protobuf contract, and nothing else.
//!
//! * `ringfeed/v1/router.proto` — the public `ringfeed.v1.Router` service, exactly as
//!   docs/protocol.md numbers it.
//! * `ringfeed/v1/node.proto` — the internal `ringfeed.v1.Node` service: routers
//!   deliver updates to a key's owner with it, and nodes replicate, hand keys over
//!   and ask each other's status with it.
//!
//! Only this crate touches generated code directly; the other crates import the types
//! from here.

#![allow(clippy::all)]

/// Package `ringfeed.v1`.
pub mod v1 {
    tonic::include_proto!("ringfeed.v1");
}

/// The encoded `FileDescriptorSet` of every ringfeed proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ringfeed_descriptor");

/// The encoded `FileDescriptorSet` of the public `ringfeed.v1.Router` service alone:
/// what the router's reflection lists.
pub const ROUTER_FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("ringfeed_router_descriptor");
