//! Chunk payloads in shared memory ([`capsnet_shm`]) as the protocol carries them: a
//! [`pb::ShmRef`] in place of the payload bytes, between a worker and a reducer of one machine.

use bytes::Bytes;
use capsnet_shm::{At, Desc, Readers};

use crate::{ProtoError, pb};

/// Rounds a worker's region for its pushes to one reducer holds: each round's payloads stay
/// where they are until that round is over (a worker pushes round r + 1 only once round r
/// closed; one round more to spare).
pub const PUSH_SLOTS: usize = 3;

/// Slots a reducer's region for its results holds per chunk of its span: the round being
/// reduced, the one still being pulled, and one more (as its pool of buffers keeps).
pub const PULL_SLOTS_PER_CHUNK: usize = 3;

/// The slot size of a reducer's region for the chunks `span` of `grid` as `enc`: the largest
/// chunk's bytes.
pub fn pull_slot_len(
    grid: &[std::ops::Range<usize>],
    span: std::ops::Range<usize>,
    enc: crate::Encoding,
) -> usize {
    let bpf = crate::wire::bytes_per_float(enc);
    span.filter_map(|i| grid.get(i))
        .map(|r| r.len() * bpf)
        .max()
        .unwrap_or(0)
}

/// The payload bytes of a reducer's region for the chunks `span` of `grid` as `enc`.
pub fn pull_region_len(
    grid: &[std::ops::Range<usize>],
    span: std::ops::Range<usize>,
    enc: crate::Encoding,
) -> u64 {
    (PULL_SLOTS_PER_CHUNK * span.len() * pull_slot_len(grid, span, enc)) as u64
}

/// The reference to a payload at `at`.
pub fn shm_ref(at: &At) -> pb::ShmRef {
    pb::ShmRef {
        path: at.region.path.clone(),
        id: Bytes::copy_from_slice(&at.region.id),
        region_len: at.region.len,
        offset: at.offset,
    }
}

/// The `len` payload bytes `r` points at, from a region of at most `max_region` bytes (opened
/// into `readers` if it was not yet), without a copy.
pub fn shm_bytes(
    readers: &Readers,
    r: &pb::ShmRef,
    len: usize,
    max_region: u64,
) -> Result<Bytes, ProtoError> {
    let id: [u8; 16] = r.id.as_ref().try_into().map_err(|_| {
        ProtoError::Invalid(format!(
            "a shared memory id of {} bytes, not 16",
            r.id.len()
        ))
    })?;
    let desc = Desc {
        path: r.path.clone(),
        id,
        len: r.region_len,
    };
    let reader = readers
        .get(&desc, max_region)
        .map_err(|e| ProtoError::Invalid(e.to_string()))?;
    reader
        .bytes(r.offset, len as u64)
        .map_err(|e| ProtoError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_reads_back_the_bytes_written() {
        let pool = capsnet_shm::SlotPool::create(2, 16).unwrap();
        let mut b = pool.take(8).unwrap();
        b.as_mut().copy_from_slice(b"payload!");
        let (bytes, at) = b.freeze();
        let readers = Readers::new(4);
        let r = shm_ref(&at);
        assert_eq!(shm_bytes(&readers, &r, 8, 32).unwrap(), bytes);
        let bad = pb::ShmRef {
            id: Bytes::from_static(b"short"),
            ..r.clone()
        };
        let e = shm_bytes(&readers, &bad, 8, 32).unwrap_err().to_string();
        assert!(e.contains("id of 5 bytes"), "{e}");
        let e = shm_bytes(&readers, &r, 8, 16).unwrap_err().to_string();
        assert!(e.contains("more than the 16 expected"), "{e}");
        let e = shm_bytes(&readers, &pb::ShmRef { offset: 30, ..r }, 8, 32).unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
    }
}
