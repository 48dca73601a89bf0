//! Who listens on a loopback port: the owner (UID) of the listening TCP socket, from the
//! kernel's tables (`/proc/net/tcp`, `/proc/net/tcp6`). The gateway forwards a lease's
//! connection only to a listener of the lease's own user, so one lease never reaches another's
//! Jupyter, TensorBoard or VNC display, nor the supplier's own services on the node, and a
//! co-tenant squatting on a lease's VNC port is never connected to.

use std::net::IpAddr;

/// TCP state `LISTEN` in the kernel's tables.
const LISTEN: &str = "0A";

/// The UIDs of the sockets listening on `port` that accept connections to `ip` (bound to it,
/// or to the wildcard address).
pub fn owners(ip: IpAddr, port: u16) -> Vec<u32> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|text| parse_listeners(&text))
        .filter(|(addr, p, _)| *p == port && serves(*addr, ip))
        .map(|(_, _, uid)| uid)
        .collect()
}

/// Whether a listener bound to `bound` accepts a connection to `target`.
fn serves(bound: IpAddr, target: IpAddr) -> bool {
    let mapped = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    bound.is_unspecified() || mapped(bound) == mapped(target)
}

/// (address, port, uid) of every listening socket in one table.
fn parse_listeners(text: &str) -> Vec<(IpAddr, u16, u32)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state, uid) = (fields.get(1)?, fields.get(3)?, fields.get(7)?);
            if *state != LISTEN {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            Some((parse_addr(addr)?, u16::from_str_radix(port, 16).ok()?, uid.parse().ok()?))
        })
        .collect()
}

/// The kernel prints addresses as 32-bit words in host (little-endian) order.
fn parse_addr(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok().map(u32::swap_bytes);
    match hex.len() {
        8 => Some(IpAddr::from(word(0)?.to_be_bytes())),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?.to_be_bytes());
            }
            Some(IpAddr::from(bytes))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as Linux 6.x prints them: 127.0.0.1:8888 by UID 1001, 0.0.0.0:22 by root, an
    // established connection, and on tcp6 ::1:6006 by UID 1002.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:22B8 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 1 1 0000000000000000 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0
   2: 0100007F:22B8 0100007F:A000 01 00000000:00000000 00:00000000 00000000  1003        0 3 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1776 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1002        0 4 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn listeners_are_read_with_their_owners() {
        let v4 = parse_listeners(TCP);
        assert_eq!(v4, vec![(IpAddr::from([127, 0, 0, 1]), 8888, 1001), (IpAddr::from([0, 0, 0, 0]), 22, 0)]);
        let v6 = parse_listeners(TCP6);
        assert_eq!(v6, vec![("::1".parse().expect("ip"), 6006, 1002)]);
    }

    #[test]
    fn wildcard_and_exact_bindings_serve_loopback() {
        let lo: IpAddr = [127, 0, 0, 1].into();
        assert!(serves([0, 0, 0, 0].into(), lo));
        assert!(serves(lo, lo));
        assert!(serves("::ffff:127.0.0.1".parse().expect("ip"), lo));
        assert!(!serves([127, 0, 0, 2].into(), lo));
        assert!(!serves("::1".parse().expect("ip"), lo));
    }
}
