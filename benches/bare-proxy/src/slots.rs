//! A worker's connections: numbered slots, reused once freed, and each connection's two
//! buffers kept for a later one, so that the steady state allocates nothing per connection.

use crate::BUFFER;

/// One buffer per direction.
pub type Buffers = [Box<[u8]>; 2];

pub struct Slots<T> {
    items: Vec<Option<T>>,
    /// Changes each time a slot is freed: whatever still names the slot's previous
    /// occupant (an event already in a batch) can tell it is not about the new one.
    generations: Vec<u32>,
    free: Vec<usize>,
    spare: Vec<Buffers>,
}

impl<T> Slots<T> {
    pub fn new() -> Self {
        Slots {
            items: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            spare: Vec::new(),
        }
    }

    /// Buffers for a new connection: a freed connection's, or new ones.
    pub fn buffers(&mut self) -> Buffers {
        self.spare.pop().unwrap_or_else(|| {
            [
                vec![0; BUFFER].into_boxed_slice(),
                vec![0; BUFFER].into_boxed_slice(),
            ]
        })
    }

    pub fn insert(&mut self, item: T) -> usize {
        match self.free.pop() {
            Some(id) => {
                self.items[id] = Some(item);
                id
            }
            None => {
                self.items.push(Some(item));
                self.generations.push(0);
                self.items.len() - 1
            }
        }
    }

    pub fn get_mut(&mut self, id: usize) -> Option<&mut T> {
        self.items.get_mut(id).and_then(Option::as_mut)
    }

    pub fn generation(&self, id: usize) -> Option<u32> {
        self.generations.get(id).copied()
    }

    /// Frees the slot; the caller hands the connection's buffers back with [`Self::recycle`].
    pub fn remove(&mut self, id: usize) -> Option<T> {
        let item = self.items.get_mut(id)?.take()?;
        self.generations[id] = self.generations[id].wrapping_add(1);
        self.free.push(id);
        Some(item)
    }

    pub fn recycle(&mut self, buffers: Buffers) {
        self.spare.push(buffers);
    }
}
