//! The core's stateless cookie challenge under load (`docs/protocol.md` §12.6), after WireGuard's
//! cookie reply.
//!
//! ```text
//! cookie      = BLAKE2s-128(key = secret, source)          secret: 32 random bytes, new every 120 s
//! CookieReply = 1 | 5 | receiver:u32 | nonce:24 | XChaCha20-Poly1305(cookie key, nonce, cookie,
//!                                                                     ad = the init's ephemeral key)
//! cookie key  = BLAKE2s-256("relay-cookie/1" | core static public key)
//! CookieInit  = 1 | 6 | sender:u32 | noise | mac:16,  mac = BLAKE2s-128(key = cookie, every byte before it)
//! ```
//!
//! `source` names the path the initiation came by (a gateway connection and flow, or a UDP
//! address), so a cookie proves the device receives what is sent to that path: a flood from
//! spoofed sources never sees its cookies and costs the core one hash and one seal per frame, no
//! Diffie-Hellman. The core keeps no state per device: a cookie is recomputed from the secret.
//! Sealing the cookie under a key only holders of the core's public key can derive, bound to the
//! initiation's ephemeral key, means a third party can neither read a cookie meant for someone else
//! nor inject a false one for a handshake it did not see.

use std::fmt;
use std::time::{Duration, Instant};

use blake2::digest::consts::U16;
use blake2::digest::{FixedOutput, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{KeyInit, XChaCha20Poly1305};
use snow::resolvers::{CryptoResolver, DefaultResolver};

use crate::frame::{
    split_tail, DeviceFrame, SessionId, COOKIE_MAC_LEN, COOKIE_NONCE_LEN, COOKIE_SEALED_LEN,
};
use crate::session::{PublicKey, SessionError};

/// How long a cookie secret is used; cookies of the one before it are still accepted.
pub const COOKIE_SECRET_SECS: u64 = 120;

/// A device keeps using a cookie this long after it arrived (then it is stale at the core).
pub const COOKIE_LIFETIME: Duration = Duration::from_secs(COOKIE_SECRET_SECS);

const LABEL: &[u8] = b"relay-cookie/1";

/// A cookie: what the device proves it received.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Cookie([u8; 16]);

impl fmt::Debug for Cookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cookie(..)")
    }
}

fn cookie_key(core: &PublicKey) -> [u8; 32] {
    let mut h = Blake2s256::new();
    Digest::update(&mut h, LABEL);
    Digest::update(&mut h, core.0);
    h.finalize().into()
}

fn mac16(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    // Keys here are 16 or 32 bytes, always within BLAKE2s's 32-byte limit.
    let Ok(mut m) = <Blake2sMac<U16> as KeyInit>::new_from_slice(key) else {
        return [0; 16];
    };
    for p in parts {
        Update::update(&mut m, p);
    }
    m.finalize_fixed().into()
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The ephemeral public key at the start of an IK message 1: what a reply is bound to.
fn ephemeral(noise: &[u8]) -> &[u8] {
    noise.get(..32).unwrap_or(noise)
}

/// The core's cookie secrets.
pub struct CookieJar {
    key: [u8; 32],
    current: [u8; 32],
    previous: [u8; 32],
    rotated: Instant,
    rng: Box<dyn snow::types::Random>,
}

impl fmt::Debug for CookieJar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CookieJar")
            .field("rotated", &self.rotated)
            .finish_non_exhaustive()
    }
}

impl CookieJar {
    /// A jar for the core whose static public key is `core_public`, with a fresh secret.
    pub fn new(core_public: &PublicKey, now: Instant) -> Result<Self, SessionError> {
        let rng = DefaultResolver
            .resolve_rng()
            .ok_or(SessionError::Noise(snow::Error::Rng))?;
        let mut jar = Self {
            key: cookie_key(core_public),
            current: [0; 32],
            previous: [0; 32],
            rotated: now,
            rng,
        };
        jar.fill_secret()?;
        jar.previous = jar.current;
        Ok(jar)
    }

    fn fill_secret(&mut self) -> Result<(), SessionError> {
        self.rng
            .try_fill_bytes(&mut self.current)
            .map_err(SessionError::Noise)
    }

    fn rotate_if_due(&mut self, now: Instant) {
        if now.saturating_duration_since(self.rotated) < COOKIE_LIFETIME {
            return;
        }
        self.previous = self.current;
        if self.fill_secret().is_err() {
            // No randomness: keep the old secret rather than use a predictable one.
            self.current = self.previous;
        }
        self.rotated = now;
    }

    /// Appends a `CookieReply` answering the initiation (`sender`, `noise` as parsed from a
    /// `HandshakeInit` or `CookieInit`) that came by `source`.
    pub fn reply(
        &mut self,
        sender: SessionId,
        noise: &[u8],
        source: &[u8],
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Result<(), SessionError> {
        self.rotate_if_due(now);
        let mut sealed = [0u8; COOKIE_SEALED_LEN];
        sealed[..16].copy_from_slice(&mac16(&self.current, &[source]));
        let mut nonce = [0u8; COOKIE_NONCE_LEN];
        self.rng
            .try_fill_bytes(&mut nonce)
            .map_err(SessionError::Noise)?;
        let cipher = XChaCha20Poly1305::new((&self.key).into());
        let tag = cipher
            .encrypt_in_place_detached((&nonce).into(), ephemeral(noise), &mut sealed[..16])
            .map_err(|_| SessionError::Authentication)?;
        sealed[16..].copy_from_slice(&tag);
        DeviceFrame::CookieReply {
            receiver: sender,
            nonce: &nonce,
            sealed: &sealed,
        }
        .encode(out);
        Ok(())
    }

    /// Whether `frame`, a whole `CookieInit` datagram, carries the MAC of `source`'s cookie under
    /// the current or the previous secret.
    pub fn check(&mut self, frame: &[u8], source: &[u8], now: Instant) -> bool {
        self.rotate_if_due(now);
        let Ok((signed, mac)) = split_tail::<COOKIE_MAC_LEN>(frame) else {
            return false;
        };
        [self.current, self.previous].iter().any(|secret| {
            let cookie = mac16(secret, &[source]);
            ct_eq(&mac16(&cookie, &[signed]), mac)
        })
    }
}

/// Device side: opens a `CookieReply` to the initiation whose Noise message 1 was `init_noise`.
pub fn open_reply(
    core: &PublicKey,
    init_noise: &[u8],
    nonce: &[u8; COOKIE_NONCE_LEN],
    sealed: &[u8; COOKIE_SEALED_LEN],
) -> Result<Cookie, SessionError> {
    let cipher = XChaCha20Poly1305::new((&cookie_key(core)).into());
    let mut cookie = [0u8; 16];
    cookie.copy_from_slice(&sealed[..16]);
    cipher
        .decrypt_in_place_detached(
            nonce.into(),
            ephemeral(init_noise),
            &mut cookie,
            (&sealed[16..]).into(),
        )
        .map_err(|_| SessionError::Authentication)?;
    Ok(Cookie(cookie))
}

/// Device side: the `CookieInit` datagram for a `HandshakeInit` datagram `init` and `cookie`.
pub fn init_with_cookie(init: &[u8], cookie: &Cookie) -> Result<Vec<u8>, SessionError> {
    let DeviceFrame::HandshakeInit { sender, noise } = DeviceFrame::decode(init)? else {
        return Err(SessionError::UnexpectedFrame(
            DeviceFrame::decode(init)?.frame_type(),
        ));
    };
    let mut out = Vec::with_capacity(init.len() + COOKIE_MAC_LEN);
    DeviceFrame::CookieInit {
        sender,
        noise,
        mac: [0; COOKIE_MAC_LEN],
    }
    .encode(&mut out);
    let signed = out.len() - COOKIE_MAC_LEN;
    let mac = mac16(&cookie.0, &[&out[..signed]]);
    out[signed..].copy_from_slice(&mac);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::StaticKeypair;

    fn init_frame(sender: u32) -> Vec<u8> {
        DeviceFrame::HandshakeInit {
            sender: SessionId(sender),
            noise: &[7u8; 105],
        }
        .to_vec()
    }

    #[test]
    fn a_cookie_echoed_from_the_same_source_checks_and_nothing_else_does() {
        let core = StaticKeypair::generate().unwrap();
        let now = Instant::now();
        let mut jar = CookieJar::new(core.public(), now).unwrap();
        let init = init_frame(9);
        let mut reply = Vec::new();
        jar.reply(SessionId(9), &init[6..], b"src-a", now, &mut reply)
            .unwrap();
        assert_eq!(reply.len(), crate::frame::COOKIE_REPLY_LEN);
        let DeviceFrame::CookieReply {
            receiver,
            nonce,
            sealed,
        } = DeviceFrame::decode(&reply).unwrap()
        else {
            panic!("not a cookie reply")
        };
        assert_eq!(receiver, SessionId(9));
        let cookie = open_reply(core.public(), &init[6..], nonce, sealed).unwrap();
        let echoed = init_with_cookie(&init, &cookie).unwrap();
        assert_eq!(echoed.len(), init.len() + 16);
        assert_eq!(echoed[1], 6);
        assert!(jar.check(&echoed, b"src-a", now));
        // Another path, an altered frame, a made-up mac: all fail.
        assert!(!jar.check(&echoed, b"src-b", now));
        let mut bad = echoed.clone();
        bad[10] ^= 1;
        assert!(!jar.check(&bad, b"src-a", now));
        let mut forged = echoed.clone();
        let n = forged.len();
        forged[n - 16..].copy_from_slice(&[0; 16]);
        assert!(!jar.check(&forged, b"src-a", now));
        // The reply opens only for the initiation it answers, and only with the right core key.
        assert!(open_reply(core.public(), &[8u8; 105], nonce, sealed).is_err());
        let other = StaticKeypair::generate().unwrap();
        assert!(open_reply(other.public(), &init[6..], nonce, sealed).is_err());
    }

    #[test]
    fn cookies_go_stale_after_two_rotations() {
        let core = StaticKeypair::generate().unwrap();
        let t0 = Instant::now();
        let mut jar = CookieJar::new(core.public(), t0).unwrap();
        let init = init_frame(1);
        let mut reply = Vec::new();
        jar.reply(SessionId(1), &init[6..], b"s", t0, &mut reply)
            .unwrap();
        let DeviceFrame::CookieReply { nonce, sealed, .. } = DeviceFrame::decode(&reply).unwrap()
        else {
            panic!("not a cookie reply")
        };
        let cookie = open_reply(core.public(), &init[6..], nonce, sealed).unwrap();
        let echoed = init_with_cookie(&init, &cookie).unwrap();
        let t1 = t0 + COOKIE_LIFETIME + Duration::from_secs(1);
        assert!(jar.check(&echoed, b"s", t1), "previous secret still valid");
        let t2 = t1 + COOKIE_LIFETIME + Duration::from_secs(1);
        assert!(!jar.check(&echoed, b"s", t2), "stale after two rotations");
    }

    #[test]
    fn only_a_handshake_init_can_carry_a_cookie() {
        let cookie = Cookie([1; 16]);
        let t = DeviceFrame::Transport {
            receiver: SessionId(1),
            counter: 0,
            ciphertext: &[0; 16],
        }
        .to_vec();
        assert!(init_with_cookie(&t, &cookie).is_err());
        assert!(init_with_cookie(&[1], &cookie).is_err());
    }
}
