//! Which waiting request runs next: the highest `priority` first, then the earliest arrival.
//! Admission happens between decode steps, so new sequences join a running batch.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

struct Entry<T> {
    priority: i32,
    arrival: u64,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    // BinaryHeap pops the greatest: higher priority, then lower arrival number.
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority
            .cmp(&other.priority)
            .then(other.arrival.cmp(&self.arrival))
    }
}

/// The waiting queue and the batch-size limit.
pub struct Scheduler<T> {
    waiting: BinaryHeap<Entry<T>>,
    arrivals: u64,
    max_batch: usize,
}

impl<T> Scheduler<T> {
    /// A scheduler that runs at most `max_batch` sequences at once.
    pub fn new(max_batch: usize) -> Self {
        Self {
            waiting: BinaryHeap::new(),
            arrivals: 0,
            max_batch: max_batch.max(1),
        }
    }

    /// Queues an item.
    pub fn push(&mut self, priority: i32, item: T) {
        self.arrivals += 1;
        self.waiting.push(Entry {
            priority,
            arrival: self.arrivals,
            item,
        });
    }

    /// The next item to admit when `running` sequences are in the batch, if there is room.
    pub fn admit(&mut self, running: usize) -> Option<T> {
        if running >= self.max_batch {
            return None;
        }
        self.waiting.pop().map(|e| e.item)
    }

    /// Drops the waiting items `keep` refuses (requests whose client went away), so that they
    /// give up their queue places without waiting for a batch slot.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.waiting.retain(|e| keep(&e.item));
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_then_arrival() {
        let mut s = Scheduler::new(10);
        s.push(0, "a");
        s.push(5, "b");
        s.push(0, "c");
        s.push(5, "d");
        let order: Vec<_> = std::iter::from_fn(|| s.admit(0)).collect();
        assert_eq!(order, ["b", "d", "a", "c"]);
    }

    #[test]
    fn retain_keeps_the_order_of_the_rest() {
        let mut s = Scheduler::new(10);
        for (p, x) in [(0, 1), (5, 2), (0, 3), (5, 4)] {
            s.push(p, x);
        }
        s.retain(|&x| x != 2 && x != 3);
        let order: Vec<_> = std::iter::from_fn(|| s.admit(0)).collect();
        assert_eq!(order, [4, 1]);
    }

    #[test]
    fn full_batch_admits_nothing() {
        let mut s = Scheduler::new(2);
        s.push(0, 1);
        assert_eq!(s.admit(2), None);
        assert_eq!(s.admit(1), Some(1));
    }
}
