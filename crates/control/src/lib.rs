//! tsunagu-server's core (being assembled).
pub mod admin;
pub mod dns;
pub mod framing;
pub mod front;
pub mod limits;
pub mod machine;
pub mod mapper;
pub mod relay;
pub mod server;
pub mod standby;
pub mod state;
