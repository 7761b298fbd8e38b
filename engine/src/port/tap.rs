//! TAP port.
