//! The speculative-decoding algorithm, pure: plain data in, plain data out.
//! The in-process engine and the gRPC orchestrator drive it the same way.

pub mod budget;
pub mod policy;
pub mod round;
pub mod stop;
pub mod verify;
