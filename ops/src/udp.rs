//! Binding the daemons' UDP sockets with receive and send buffers sized for bursts.
//!
//! The kernel's default receive buffer (about 200 KiB) overflowed under `device-sim bench`'s load
//! of 200 meters with 32 readings in flight each: 14–20% of datagrams were dropped in the kernel
//! before either daemon could read them, and every drop cost a 500 ms retransmission.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// The buffer size requested by default; Linux caps it at `net.core.rmem_max`/`wmem_max`.
pub const DEFAULT_BUFFER_BYTES: usize = 4 << 20;

/// Binds a non-blocking UDP socket on `addr` with `buffer_bytes` of receive and send buffer
/// (best effort: a kernel that grants less is not an error).
pub fn bind(addr: SocketAddr, buffer_bytes: usize) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Dual-stack where the address is the unspecified one; harmless otherwise.
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(buffer_bytes);
    let _ = socket.set_send_buffer_size(buffer_bytes);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn binds_with_a_larger_buffer() {
        let s = super::bind("127.0.0.1:0".parse().unwrap(), 1 << 20).unwrap();
        let sock = socket2::SockRef::from(&s);
        // Linux reports double the granted size; anything above the usual default will do.
        assert!(sock.recv_buffer_size().unwrap() > 256 * 1024);
        assert_ne!(s.local_addr().unwrap().port(), 0);
    }
}
