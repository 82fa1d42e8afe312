//! The frames the sessions have built and the worker has not yet sent,
//! in order, each with the interface it leaves by, and how many wait for
//! each interface: whether a side has frames waiting is asked once per
//! split connection per batch, and must not cost a scan of the queue
//! (which grows to thousands of frames while a side's TX is blocked).

use crate::flow::Side;

/// Frames to send: (out of which interface, bytes), oldest first.
#[derive(Debug, Default)]
pub struct Outbox {
    frames: Vec<(Side, Vec<u8>)>,
    waiting: [usize; 2],
}

impl Outbox {
    pub fn push(&mut self, frame: (Side, Vec<u8>)) {
        self.waiting[frame.0.index()] += 1;
        self.frames.push(frame);
    }

    /// Whether any frame waits to leave by `side`.
    pub fn has(&self, side: Side) -> bool {
        self.waiting[side.index()] > 0
    }

    /// Keeps the frames `keep` says to, in order; it may take a dropped
    /// frame's buffer.
    pub fn retain_mut(&mut self, mut keep: impl FnMut(&mut (Side, Vec<u8>)) -> bool) {
        let waiting = &mut self.waiting;
        self.frames.retain_mut(|f| {
            let kept = keep(f);
            if !kept {
                waiting[f.0.index()] -= 1;
            }
            kept
        });
    }

    /// Drops every frame after the first `len`.
    pub fn truncate(&mut self, len: usize) {
        for (side, _) in self.frames.iter().skip(len) {
            self.waiting[side.index()] -= 1;
        }
        self.frames.truncate(len);
    }

    /// Every frame, oldest first; the box is left empty.
    pub fn drain(&mut self) -> std::vec::IntoIter<(Side, Vec<u8>)> {
        std::mem::take(self).into_iter()
    }
}

impl std::ops::Deref for Outbox {
    type Target = [(Side, Vec<u8>)];

    fn deref(&self) -> &Self::Target {
        &self.frames
    }
}

impl Extend<(Side, Vec<u8>)> for Outbox {
    fn extend<I: IntoIterator<Item = (Side, Vec<u8>)>>(&mut self, frames: I) {
        for f in frames {
            self.push(f);
        }
    }
}

impl FromIterator<(Side, Vec<u8>)> for Outbox {
    fn from_iter<I: IntoIterator<Item = (Side, Vec<u8>)>>(frames: I) -> Self {
        let mut out = Outbox::default();
        out.extend(frames);
        out
    }
}

impl IntoIterator for Outbox {
    type Item = (Side, Vec<u8>);
    type IntoIter = std::vec::IntoIter<(Side, Vec<u8>)>;

    fn into_iter(self) -> Self::IntoIter {
        self.frames.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counts_follow_pushes_retains_and_drains() {
        let mut out: Outbox = [(Side::Inside, vec![1]), (Side::Outside, vec![2])]
            .into_iter()
            .collect();
        assert!(out.has(Side::Inside) && out.has(Side::Outside));
        out.retain_mut(|(side, _)| *side == Side::Outside);
        assert!(!out.has(Side::Inside) && out.has(Side::Outside));
        out.push((Side::Inside, vec![3]));
        out.extend([(Side::Inside, vec![4])]);
        assert_eq!(out.len(), 3);
        let mut drop_first_inside = true;
        out.retain_mut(|(side, _)| {
            !(*side == Side::Inside && std::mem::take(&mut drop_first_inside))
        });
        assert!(out.has(Side::Inside));
        assert_eq!(out.iter().map(|(_, f)| f[0]).collect::<Vec<_>>(), [2, 4]);
        out.push((Side::Outside, vec![5]));
        out.truncate(2);
        assert_eq!(out.len(), 2);
        out.truncate(1);
        assert!(!out.has(Side::Inside) && out.has(Side::Outside));
        out.push((Side::Inside, vec![6]));
        let drained: Vec<_> = out.drain().collect();
        assert_eq!(drained.len(), 2);
        assert!(out.is_empty() && !out.has(Side::Inside) && !out.has(Side::Outside));
    }
}
