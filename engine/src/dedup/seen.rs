//! The keys a first-arrival reduction has let through: a set of byte strings that only grows.
//!
//! At SF 10 it holds 30 million event ids, far beyond the caches, and nearly every probe is of
//! a key not seen before, so a probe costs what its cache misses cost. hashbrown's table took
//! three misses per probe (its control bytes, its slot, then the key list) and probed one key
//! at a time. Here a slot is one `u64` holding a tag of the key's hash and where the key's
//! bytes are, so a new key costs the one miss of its slot; and a batch's slots are loaded a
//! chunk ahead of the probes, so that the misses of a chunk overlap instead of queueing.

use std::hash::BuildHasher;

use datafusion::arrow::array::BooleanBufferBuilder;
use datafusion::arrow::buffer::BooleanBuffer;
use datafusion::error::DataFusionError;

/// Bytes of one block of key bytes: blocks are never grown, so a key never moves and growing
/// the store never copies it.
const BLOCK_BYTES: usize = 4 * 1024 * 1024;
/// Bits of a slot that say where a key is: its block and its offset in the block.
const LOCATION_BITS: u32 = 44;
const OFFSET_BITS: u32 = BLOCK_BYTES.trailing_zeros();
/// Keys whose slots are loaded together before they are probed: enough loads in flight to
/// overlap their misses, few enough that the lines are still cached when the probes come.
const CHUNK: usize = 256;
/// Bytes before each key: its length.
const LEN_BYTES: usize = 4;

/// A growing set of keys (byte strings), hashed by `S`.
pub(super) struct KeySet<S> {
    hasher: S,
    blocks: Vec<Vec<u8>>,
    /// Open addressing, linear probing, a power of two long. 0 is an empty slot; otherwise the
    /// top `64 - LOCATION_BITS` bits are the key hash's top bits and the rest is 1 + the key's
    /// location (block and offset).
    slots: Vec<u64>,
    len: usize,
}

impl<S: BuildHasher> KeySet<S> {
    /// A set sized for `expected` keys, so that it does not grow while they arrive.
    pub fn with_capacity(expected: usize, hasher: S) -> Self {
        Self {
            hasher,
            blocks: Vec::new(),
            slots: vec![0; slots_for(expected)],
            len: 0,
        }
    }

    /// Bytes held: the slots and the key blocks.
    pub fn allocated_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<u64>()
            + self.blocks.iter().map(Vec::capacity).sum::<usize>()
    }

    /// Inserts keys `0..count` in turn; the result says which were new (of equal keys among
    /// them, the first).
    pub fn insert_new<'a>(
        &mut self,
        count: usize,
        key: impl Fn(usize) -> &'a [u8],
    ) -> Result<BooleanBuffer, DataFusionError> {
        let mut new = BooleanBufferBuilder::new(count);
        let mut hashes = Vec::with_capacity(CHUNK);
        for start in (0..count).step_by(CHUNK) {
            let end = (start + CHUNK).min(count);
            hashes.clear();
            hashes.extend((start..end).map(|i| self.hasher.hash_one(key(i))));
            // Grown before the chunk's slots are loaded, so their places hold for its probes.
            self.reserve(end - start);
            self.load_slots(&hashes);
            for (i, hash) in (start..end).zip(&hashes) {
                new.append(self.insert(key(i), *hash)?);
            }
        }
        Ok(new.finish())
    }

    /// Touches the first slot of each hash. The loads are independent, so the processor has
    /// many of their misses in flight at once; the probes that follow find the lines cached.
    fn load_slots(&self, hashes: &[u64]) {
        let mask = self.slots.len() - 1;
        let mut any = 0u64;
        for h in hashes {
            any |= self.slots[*h as usize & mask];
        }
        std::hint::black_box(any);
    }

    /// Inserts `key` unless present; whether it was new.
    fn insert(&mut self, key: &[u8], hash: u64) -> Result<bool, DataFusionError> {
        let mask = self.slots.len() - 1;
        let tag = hash >> LOCATION_BITS;
        let mut at = hash as usize & mask;
        loop {
            let slot = self.slots[at];
            if slot == 0 {
                break;
            }
            if slot >> LOCATION_BITS == tag && self.key_at(slot) == key {
                return Ok(false);
            }
            at = (at + 1) & mask;
        }
        let location = self.store(key)?;
        self.slots[at] = (tag << LOCATION_BITS) | (location + 1);
        self.len += 1;
        Ok(true)
    }

    /// The bytes of the key a full slot points at.
    fn key_at(&self, slot: u64) -> &[u8] {
        let location = (slot & ((1 << LOCATION_BITS) - 1)) - 1;
        let block = &self.blocks[(location >> OFFSET_BITS) as usize];
        let offset = (location & ((1 << OFFSET_BITS) - 1)) as usize;
        let mut len = [0u8; LEN_BYTES];
        len.copy_from_slice(&block[offset..offset + LEN_BYTES]);
        let start = offset + LEN_BYTES;
        &block[start..start + u32::from_le_bytes(len) as usize]
    }

    /// Appends `key` to the blocks; its location.
    fn store(&mut self, key: &[u8]) -> Result<u64, DataFusionError> {
        let len = u32::try_from(key.len()).map_err(|_| {
            DataFusionError::Execution("a key of 4 GiB or more cannot be kept".into())
        })?;
        let need = LEN_BYTES + key.len();
        // A key is placed only where it starts inside a block's first BLOCK_BYTES, so its
        // offset fits; a key larger than a block gets a block of its own.
        let fits = self
            .blocks
            .last()
            .is_some_and(|b| b.len() + need <= BLOCK_BYTES);
        if !fits {
            self.blocks.push(Vec::with_capacity(BLOCK_BYTES.max(need)));
        }
        let block = self.blocks.len() - 1;
        if block as u64 >= 1 << (LOCATION_BITS - OFFSET_BITS) {
            return Err(DataFusionError::Execution(
                "the first-arrival key set is full (16 TiB of keys)".into(),
            ));
        }
        let bytes = &mut self.blocks[block];
        let offset = bytes.len();
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(key);
        Ok(((block as u64) << OFFSET_BITS) | offset as u64)
    }

    /// Makes room for `more` keys at a load of at most three quarters, doubling the slots
    /// (and placing every key again) when needed.
    fn reserve(&mut self, more: usize) {
        let wanted = slots_for(self.len + more);
        if wanted <= self.slots.len() {
            return;
        }
        let old = std::mem::replace(&mut self.slots, vec![0; wanted]);
        let mask = wanted - 1;
        for slot in old.into_iter().filter(|s| *s != 0) {
            // The slot keeps only the hash's top bits; its place comes from the key again.
            let hash = self.hasher.hash_one(self.key_at(slot));
            let mut at = hash as usize & mask;
            while self.slots[at] != 0 {
                at = (at + 1) & mask;
            }
            self.slots[at] = slot;
        }
    }
}

/// Slots for `keys` keys at a load of at most three quarters: a power of two.
fn slots_for(keys: usize) -> usize {
    (keys.saturating_mul(4) / 3 + 1)
        .next_power_of_two()
        .max(CHUNK)
}

#[cfg(test)]
mod tests {
    use std::hash::{BuildHasherDefault, DefaultHasher, Hasher};

    use super::*;

    fn insert<S: BuildHasher>(set: &mut KeySet<S>, keys: &[Vec<u8>]) -> Vec<bool> {
        let new = set.insert_new(keys.len(), |i| keys[i].as_slice()).unwrap();
        new.iter().collect()
    }

    /// Keys inserted over several batches, from an empty set that must grow many times, some
    /// repeated within a batch and across batches: each is new exactly once, the first time.
    #[test]
    fn each_key_is_new_once_across_growth() {
        let mut set = KeySet::with_capacity(0, BuildHasherDefault::<DefaultHasher>::default());
        let mut seen = std::collections::HashSet::new();
        for batch in 0..20u64 {
            let keys: Vec<Vec<u8>> = (0..5_000u64)
                .map(|i| format!("k{}", (batch * 3_001 + i * 7) % 40_000).into_bytes())
                .collect();
            for (key, new) in keys.iter().zip(insert(&mut set, &keys)) {
                assert_eq!(new, seen.insert(key.clone()), "key {key:?}");
            }
        }
        assert_eq!(set.len, seen.len());
        assert!(set.slots.len() >= seen.len() * 4 / 3);
    }

    /// Every key hashes the same.
    #[derive(Default)]
    struct Constant;
    impl Hasher for Constant {
        fn finish(&self) -> u64 {
            0xdead_beef_0000_0005
        }
        fn write(&mut self, _: &[u8]) {}
    }

    /// Every key with the same hash, over growth: the probes walk past full slots and compare
    /// bytes, so equal tags do not make different keys equal. The empty key and a key larger
    /// than a block are kept too, and keys after it.
    #[test]
    fn colliding_hashes_empty_and_oversized_keys() {
        let mut set = KeySet::with_capacity(4, BuildHasherDefault::<Constant>::default());
        let mut keys: Vec<Vec<u8>> = (0..1_000u32).map(|i| i.to_le_bytes().to_vec()).collect();
        keys.push(Vec::new());
        keys.push(vec![7u8; BLOCK_BYTES + 10]);
        keys.push(b"after the large key".to_vec());
        assert!(insert(&mut set, &keys).iter().all(|n| *n));
        assert!(insert(&mut set, &keys).iter().all(|n| !*n));
        assert_eq!(set.len, keys.len());
        assert_eq!(set.blocks.len(), 3);
    }
}
