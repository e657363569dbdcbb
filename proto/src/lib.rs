//! DuoDecoding gRPC: the generated `duo.v1` code ([`pb`]), conversions
//! between it and the core's types ([`convert`]), and the plumbing every
//! service shares ([`serve`]: logging, health, reflection, graceful
//! shutdown, session limits; [`status`]: errors as gRPC statuses).

pub mod convert;
pub mod metrics;
pub mod serve;
pub mod status;
pub mod worker;

/// Generated protocol code (`proto/duo/v1/duo.proto`).
#[allow(clippy::all)]
pub mod pb {
    tonic::include_proto!("duo.v1");

    /// Encoded descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/duo_descriptor.bin"));
}
