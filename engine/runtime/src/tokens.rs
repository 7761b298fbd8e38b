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
/// The listener of DNS over TCP to the virtual host (`sock::dns_tcp`), then its connections'
/// two sockets each.
pub const FIRST_DNS_TCP_TOKEN: usize = FIRST_RESERVED_TOKEN + (1 << 20);
/// The listeners of port forwards (`sock::forward`), numbered up from here, below the ports'.
pub const FIRST_FORWARD_TOKEN: usize = FIRST_RESERVED_TOKEN + (1 << 22);

/// The ports the control thread reads through the switch (every port but the first TAP): the
/// token of port N is `FIRST_PORT_TOKEN + N`. Far above the operator's tokens, which are few.
pub const FIRST_PORT_TOKEN: usize = FIRST_RESERVED_TOKEN + (1 << 24);

/// The token of port `id`.
pub fn port_token(id: u32) -> Token {
    Token(FIRST_PORT_TOKEN + id as usize)
}

/// The port whose token `t` is, if it is a port's.
pub fn port_of_token(t: usize) -> Option<u32> {
    t.checked_sub(FIRST_PORT_TOKEN)
        .and_then(|n| u32::try_from(n).ok())
}

/// The operator's sources (control socket, metrics, reload signal, their connections) are
/// tokens from here up, numbered by the operator.
pub const FIRST_OPERATOR_TOKEN: usize = FIRST_RESERVED_TOKEN + 16;
