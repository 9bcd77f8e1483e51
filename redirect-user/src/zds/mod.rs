//! The node-agent protocol (zds.md): messages, their checked encoding, and the
//! lifecycle state machines of both sides.

pub mod codec;
pub mod proto;
pub mod proxy;
pub mod proxy_state;
pub mod wire;
