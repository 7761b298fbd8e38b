//! Every mio token of the runtime's polls, in one place.
//!
//! A host socket's token is its `SockId` (the socket driver numbers them from 0 and never
//! reaches `FIRST_RESERVED_TOKEN`); the tokens from there up are the runtime's own sources.

use mio::Token;

/// The first token not used by a host socket.
pub const FIRST_RESERVED_TOKEN: usize = u32::MAX as usize;

/// The frame port (the TAP queue a thread reads).
pub const PORT: Token = Token(FIRST_RESERVED_TOKEN);
/// The stop descriptor (a signal arrived).
pub const STOP: Token = Token(FIRST_RESERVED_TOKEN + 1);
/// A thread's inbox waker (frames or commands were queued for it).
pub const WAKE: Token = Token(FIRST_RESERVED_TOKEN + 5);
/// A thread's io_uring (completions are waiting).
pub const RING: Token = Token(FIRST_RESERVED_TOKEN + 6);
/// The operator's sources (control socket, metrics, reload signal, their connections) are
/// tokens from here up, numbered by the operator.
pub const FIRST_OPERATOR_TOKEN: usize = FIRST_RESERVED_TOKEN + 16;
