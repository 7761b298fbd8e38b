//! Frame ports: where hubnat's frames come from and go to.

pub mod af_packet;
pub mod segment;
pub mod tap;
