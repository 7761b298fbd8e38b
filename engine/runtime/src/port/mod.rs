//! Frame ports: where hubnat's frames come from and go to.

pub mod af_packet;
pub mod link;
pub mod packet_link;
pub mod segment;
pub mod spec;
pub mod steer;
pub mod switch;
pub mod tap;
pub mod unix;
pub mod vnet;
