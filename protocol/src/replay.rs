//! The sliding replay window for explicit transport counters (`docs/protocol.md` §6.3).
//!
//! snow's stateless transport takes the nonce from the frame and keeps no memory of it, so the
//! window is ours: a frame whose counter is newer than anything seen, or inside the window and not
//! yet seen, is accepted once; anything older than the window or already seen is refused.

/// How many counters behind the newest one are still accepted (once each).
pub const WINDOW: u64 = 1024;

const WORDS: usize = (WINDOW / 64) as usize;

/// Why a counter was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// The counter was already accepted once.
    #[error("counter already seen")]
    Replayed,
    /// The counter lies more than [`WINDOW`] behind the newest accepted one.
    #[error("counter older than the replay window")]
    TooOld,
}

/// A 1024-counter sliding window. Bit `i` of the bitmap stands for counter `top - 1 - i`.
#[derive(Clone, Debug, Default)]
pub struct ReplayWindow {
    /// One past the highest counter accepted; 0 before the first.
    top: u64,
    bitmap: [u64; WORDS],
}

impl ReplayWindow {
    /// A window that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// A window for a resumed session (`crate::session::SessionSnapshot`): every counter below
    /// `floor` counts as seen, so nothing received before the snapshot can be replayed after it.
    pub fn resumed(floor: u64) -> Self {
        if floor == 0 {
            return Self::new();
        }
        Self {
            top: floor,
            bitmap: [u64::MAX; WORDS],
        }
    }

    /// One past the highest counter accepted (0 before the first): a resumed window's floor.
    pub fn floor(&self) -> u64 {
        self.top
    }

    /// Whether `counter` would be accepted. Cheap: call it before spending an AEAD open on a frame,
    /// then [`ReplayWindow::accept`] once the frame has authenticated.
    pub fn check(&self, counter: u64) -> Result<(), ReplayError> {
        if counter >= self.top {
            return Ok(());
        }
        let back = self.top - 1 - counter;
        if back >= WINDOW {
            return Err(ReplayError::TooOld);
        }
        if self.bit(back) {
            Err(ReplayError::Replayed)
        } else {
            Ok(())
        }
    }

    /// Records `counter` as seen, if it is acceptable. Only call it for an authenticated frame:
    /// an unauthenticated counter must never move the window.
    pub fn accept(&mut self, counter: u64) -> Result<(), ReplayError> {
        self.check(counter)?;
        if counter >= self.top {
            let shift = counter - self.top + 1;
            self.shift(shift);
            self.top = counter + 1;
            self.bitmap[0] |= 1;
        } else {
            let back = self.top - 1 - counter;
            self.bitmap[(back / 64) as usize] |= 1 << (back % 64);
        }
        Ok(())
    }

    /// The highest counter accepted so far.
    pub fn highest(&self) -> Option<u64> {
        self.top.checked_sub(1)
    }

    fn bit(&self, back: u64) -> bool {
        self.bitmap[(back / 64) as usize] & (1 << (back % 64)) != 0
    }

    fn shift(&mut self, by: u64) {
        if by >= WINDOW {
            self.bitmap = [0; WORDS];
            return;
        }
        let words = (by / 64) as usize;
        let bits = (by % 64) as u32;
        for i in (0..WORDS).rev() {
            let hi = i.checked_sub(words).map_or(0, |j| self.bitmap[j]);
            let lo = i.checked_sub(words + 1).map_or(0, |j| self.bitmap[j]);
            self.bitmap[i] = if bits == 0 {
                hi
            } else {
                (hi << bits) | (lo >> (64 - bits))
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn accepts_reordered_once_and_refuses_replays() {
        let mut w = ReplayWindow::new();
        for c in [0u64, 2, 1, 5, 3, 4] {
            assert_eq!(w.accept(c), Ok(()), "counter {c}");
        }
        for c in 0..=5 {
            assert_eq!(w.accept(c), Err(ReplayError::Replayed));
        }
        w.accept(5 + WINDOW).unwrap();
        assert_eq!(w.check(5), Err(ReplayError::TooOld));
        assert_eq!(w.check(6), Ok(()));
        assert_eq!(w.highest(), Some(5 + WINDOW));
    }

    #[test]
    fn full_window_width_is_usable() {
        let mut w = ReplayWindow::new();
        w.accept(WINDOW - 1).unwrap();
        // Every counter down to 0 is within the window and accepted once.
        for c in (0..WINDOW - 1).rev() {
            assert_eq!(w.accept(c), Ok(()), "counter {c}");
        }
        for c in 0..WINDOW {
            assert_eq!(w.check(c), Err(ReplayError::Replayed));
        }
    }

    proptest! {
        /// Against a model that remembers everything: within the window the answers agree, and
        /// nothing is ever accepted twice.
        #[test]
        fn matches_model(counters in proptest::collection::vec(0u64..4096, 1..600)) {
            let mut w = ReplayWindow::new();
            let mut seen = BTreeSet::new();
            let mut top = 0u64;
            for c in counters {
                let model_ok = !seen.contains(&c) && (c >= top || top - 1 - c < WINDOW);
                let got = w.accept(c).is_ok();
                prop_assert_eq!(got, model_ok, "counter {}", c);
                if got {
                    seen.insert(c);
                    top = top.max(c + 1);
                }
            }
        }
    }
}
