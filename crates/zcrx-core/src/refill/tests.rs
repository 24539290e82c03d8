use super::*;

fn entry(id: u64) -> io_uring_zcrx_rqe {
    io_uring_zcrx_rqe {
        off: id,
        len: id as u32,
        __pad: 0,
    }
}

fn ids(entries: &[io_uring_zcrx_rqe]) -> Vec<u64> {
    entries.iter().map(|e| e.off).collect()
}

#[test]
fn refill_entry_replaces_the_token_bits() {
    let token = 2u64 << 48;
    // Whatever the CQE carried in the top bits, the entry gets the area's token.
    let rqe = refill_entry((5u64 << 48) | 0x1234, 7, token);
    assert_eq!(rqe.off, token | 0x1234);
    assert_eq!((rqe.len, rqe.__pad), (7, 0));
    assert_eq!(refill_entry(0x1000, 1, 0).off, 0x1000);
}

#[test]
fn ring_size_must_be_a_power_of_two_in_range() {
    for bad in [0, 3, 6, MAX_RING_ENTRIES * 2, u32::MAX] {
        assert_eq!(
            FakeRefillRegion::create(bad).unwrap_err(),
            RingSizeError { entries: bad }
        );
    }
    for good in [1, 2, 64, 32768] {
        let (ring, _kernel) = FakeRefillRegion::create(good).unwrap();
        assert_eq!(ring.entries(), good);
    }
    assert!(RingSizeError { entries: 3 }
        .to_string()
        .contains("power of two"));
}

#[test]
fn pushes_are_consumed_in_order() {
    let (ring, mut kernel) = FakeRefillRegion::create(8).unwrap();
    for id in 1..=5 {
        assert_eq!(ring.push(entry(id)), PushOutcome::InRing);
    }
    assert_eq!(kernel.available(), 5);
    assert_eq!(ids(&kernel.consume(2)), [1, 2]);
    assert_eq!(ids(&kernel.consume(usize::MAX)), [3, 4, 5]);
    assert_eq!(kernel.consume(usize::MAX), []);
    assert_eq!((kernel.head(), kernel.tail()), (5, 5));
}

#[test]
fn full_ring_overflows_and_flush_moves_entries_when_space_appears() {
    let (ring, mut kernel) = FakeRefillRegion::create(4).unwrap();
    for id in 1..=4 {
        assert_eq!(ring.push(entry(id)), PushOutcome::InRing);
    }
    assert!(!ring.has_overflow());
    assert_eq!(ring.push(entry(5)), PushOutcome::Overflowed);
    assert_eq!(ring.push(entry(6)), PushOutcome::Overflowed);
    assert!(ring.has_overflow());
    assert_eq!(ring.overflow_len(), 2);

    // No space yet: nothing moves, nothing is lost.
    assert_eq!(ring.flush_overflow(), 0);
    assert_eq!(ring.overflow_len(), 2);

    assert_eq!(ids(&kernel.consume(1)), [1]);
    assert_eq!(ring.flush_overflow(), 1);
    assert_eq!(ring.overflow_len(), 1);
    assert_eq!(ids(&kernel.consume(usize::MAX)), [2, 3, 4, 6]);
    assert_eq!(ring.flush_overflow(), 1);
    assert!(!ring.has_overflow());
    assert_eq!(ids(&kernel.consume(usize::MAX)), [5]);
    assert_eq!(ring.flush_overflow(), 0);

    let stats = ring.stats();
    assert_eq!(
        stats,
        RefillStats {
            pushed: 6,
            published: 6,
            overflowed: 2,
            overflow_pending: 0,
            unconsumed: 0,
        }
    );
}

#[test]
fn a_ring_of_one_slot_works() {
    let (ring, mut kernel) = FakeRefillRegion::create(1).unwrap();
    assert_eq!(ring.push(entry(1)), PushOutcome::InRing);
    assert_eq!(ring.push(entry(2)), PushOutcome::Overflowed);
    assert_eq!(ids(&kernel.consume(usize::MAX)), [1]);
    assert_eq!(ring.flush_overflow(), 1);
    assert_eq!(ring.push(entry(3)), PushOutcome::Overflowed);
    assert_eq!(ids(&kernel.consume(usize::MAX)), [2]);
    assert_eq!(ring.flush_overflow(), 1);
    assert_eq!(ids(&kernel.consume(usize::MAX)), [3]);
    assert_eq!(ring.stats().published, 3);
}

#[test]
fn batch_fills_the_ring_and_overflows_the_rest() {
    let (ring, mut kernel) = FakeRefillRegion::create(4).unwrap();
    assert_eq!(ring.push(entry(100)), PushOutcome::InRing);
    let batch: Vec<_> = (1..=6).map(entry).collect();
    assert_eq!(
        ring.push_batch(&batch),
        BatchOutcome {
            in_ring: 3,
            overflowed: 3
        }
    );
    assert_eq!(ids(&kernel.consume(usize::MAX)), [100, 1, 2, 3]);
    assert_eq!(ring.flush_overflow(), 3);
    let mut rest = ids(&kernel.consume(usize::MAX));
    rest.sort_unstable();
    assert_eq!(rest, [4, 5, 6]);
    assert_eq!(ring.push_batch(&[]), BatchOutcome::default());
    assert_eq!(ring.stats().pushed, 7);
}

#[test]
fn indices_wrap_around_u32() {
    let (ring, mut kernel) = FakeRefillRegion::create_at(4, u32::MAX - 2).unwrap();
    let mut next = 1;
    let mut consumed = Vec::new();
    for _ in 0..10 {
        for _ in 0..3 {
            assert_eq!(ring.push(entry(next)), PushOutcome::InRing);
            next += 1;
        }
        kernel.consume_into(&mut consumed, usize::MAX);
    }
    assert_eq!(ids(&consumed), (1..next).collect::<Vec<_>>());
    assert_eq!(kernel.tail(), (u32::MAX - 2).wrapping_add(30));
    let stats = ring.stats();
    assert_eq!((stats.pushed, stats.published), (30, 30));
}

#[test]
fn an_unfinished_earlier_slot_holds_back_publication_until_it_commits() {
    let (ring, mut kernel) = FakeRefillRegion::create(8).unwrap();
    // A producer claims slot 0 and is "preempted" before writing it.
    let (slow, claimed) = ring.claim(1);
    assert_eq!((slow, claimed), (0, 1));
    // Later pushes are written but must not become visible past the unwritten slot.
    assert_eq!(ring.push(entry(2)), PushOutcome::InRing);
    assert_eq!(ring.push(entry(3)), PushOutcome::InRing);
    assert_eq!(kernel.available(), 0);
    assert_eq!(ring.stats().published, 0);
    // The slow producer finishes: its publish step releases everything.
    ring.write_and_commit(slow, entry(1));
    ring.publish();
    assert_eq!(ids(&kernel.consume(usize::MAX)), [1, 2, 3]);
}

#[test]
fn a_broken_consumer_head_means_full_not_a_spin() {
    let (ring, kernel) = FakeRefillRegion::create(4).unwrap();
    // A head beyond the tail: the consumer broke its contract.
    kernel.memory.head.store(10, Ordering::Release);
    assert_eq!(ring.push(entry(1)), PushOutcome::Overflowed);
    assert_eq!(ring.overflow_len(), 1);
}

#[test]
fn take_unflushed_counts_publications_since_the_last_call() {
    let (ring, mut kernel) = FakeRefillRegion::create(8).unwrap();
    assert_eq!(ring.take_unflushed(), 0);
    let _ = ring.push_batch(&[entry(1), entry(2), entry(3)]);
    assert_eq!(ring.unconsumed(), 3);
    assert_eq!(ring.take_unflushed(), 3);
    assert_eq!(ring.take_unflushed(), 0);
    kernel.consume(2);
    assert_eq!(ring.unconsumed(), 1);
    let _ = ring.push(entry(4));
    assert_eq!(ring.take_unflushed(), 1);
    assert_eq!(ring.unconsumed(), 2);
}

#[test]
fn consumed_slots_are_poisoned() {
    let (ring, mut kernel) = FakeRefillRegion::create(2).unwrap();
    let _ = ring.push(entry(1));
    assert_eq!(ids(&kernel.consume(1)), [1]);
    // SAFETY: nothing else accesses the slot: it is consumed and the ring is idle.
    let poisoned = kernel.memory.rqes[0].with(|p| unsafe { p.read() });
    assert_eq!(poisoned, FakeRefillRegion::POISON);
}

/// The kernel's refill region: a header with head and tail, entries at offset 64.
#[repr(C, align(64))]
struct KernelLikeRegion {
    head: AtomicU32,
    tail: AtomicU32,
    _header: [u8; 56],
    rqes: [io_uring_zcrx_rqe; 4],
}

#[test]
fn from_raw_parts_starts_at_the_current_tail() {
    let mut region = Box::new(KernelLikeRegion {
        head: AtomicU32::new(6),
        tail: AtomicU32::new(7),
        _header: [0; 56],
        rqes: [io_uring_zcrx_rqe::default(); 4],
    });
    // Entry 6 was published by a previous producer.
    region.rqes[6 % 4] = entry(66);
    let base: *mut KernelLikeRegion = &mut *region;
    // SAFETY: the region outlives the ring (dropped at the end of the test, after it); head
    // and tail are atomics written only as the contract says (by this test playing the
    // kernel, and by the ring); the test reads slots only between head and tail.
    let ring = unsafe {
        RefillRing::from_raw_parts(
            ptr::addr_of!((*base).head),
            ptr::addr_of!((*base).tail),
            ptr::addr_of_mut!((*base).rqes).cast(),
            4,
        )
    }
    .unwrap();
    // Ring has 1 unconsumed entry, so 3 free slots.
    assert_eq!(ring.unconsumed(), 1);
    let outcome = ring.push_batch(&[entry(7), entry(8), entry(9), entry(10)]);
    assert_eq!(
        outcome,
        BatchOutcome {
            in_ring: 3,
            overflowed: 1
        }
    );
    // SAFETY: reading the published slots as the kernel would, after an acquire of tail.
    let tail = unsafe { &(*base).tail }.load(Ordering::Acquire);
    assert_eq!(tail, 10);
    let published: Vec<u64> = (6..10u32)
        // SAFETY: as above; the ring does not write published slots.
        .map(|i| unsafe { ptr::addr_of!((*base).rqes[(i % 4) as usize]).read() }.off)
        .collect();
    assert_eq!(published, [66, 7, 8, 9]);
    assert_eq!(
        ring.stats(),
        RefillStats {
            pushed: 4,
            published: 3,
            overflowed: 1,
            overflow_pending: 1,
            unconsumed: 4,
        }
    );
    drop(ring);
}

#[test]
fn debug_output_names_the_state() {
    let (ring, kernel) = FakeRefillRegion::create(4).unwrap();
    let _ = ring.push(entry(1));
    let text = format!("{ring:?} {kernel:?}");
    assert!(text.contains("RefillRing"), "{text}");
    assert!(text.contains("tail: 1"), "{text}");
    assert!(text.contains("FakeRefillRegion"), "{text}");
}

#[test]
fn ring_layout_accepts_what_kernels_report() {
    // Before 6.18: entries right after the indices; from 6.18: on their own cache line.
    for (rqes, region) in [(8, 8 + 16 * 128), (64, 4096 * 2)] {
        let layout = RingLayout::validate(0, 4, rqes, 128, region).unwrap();
        assert_eq!(
            layout,
            RingLayout {
                head: 0,
                tail: 4,
                rqes: rqes as usize,
                entries: 128
            }
        );
    }
    // Entries first, indices after them, exactly filling the region.
    assert!(RingLayout::validate(64, 68, 0, 4, 72).is_ok());
}

#[test]
fn ring_layout_rejects_misaligned_fields() {
    let misaligned = |field, offset| RingLayoutError::Misaligned { field, offset };
    assert_eq!(
        RingLayout::validate(2, 4, 64, 4, 4096),
        Err(misaligned("head", 2))
    );
    assert_eq!(
        RingLayout::validate(0, 5, 64, 4, 4096),
        Err(misaligned("tail", 5))
    );
    assert_eq!(
        RingLayout::validate(0, 4, 12, 4, 4096),
        Err(misaligned("rqes", 12))
    );
}

#[test]
fn ring_layout_rejects_fields_outside_the_region() {
    let outside = |field, offset, len| RingLayoutError::OutsideRegion {
        field,
        offset,
        len,
        region_len: 4096,
    };
    assert_eq!(
        RingLayout::validate(4096, 4, 64, 4, 4096),
        Err(outside("head", 4096, 4))
    );
    assert_eq!(
        RingLayout::validate(0, 4094 & !3, 64, 4, 4096).map(|_| ()),
        Ok(()),
        "the last 4 bytes are inside"
    );
    assert_eq!(
        RingLayout::validate(0, !3u32, 64, 4, 4096),
        Err(outside("tail", u64::from(!3u32), 4))
    );
    // 64 + 256 * 16 = 4160: the last four entries stick out.
    assert_eq!(
        RingLayout::validate(0, 4, 64, 256, 4096),
        Err(outside("rqes", 64, 256 * 16))
    );
    assert_eq!(
        RingLayout::validate(0, 4, !7u32, 1 << 24, 4096),
        Err(outside("rqes", u64::from(!7u32), 16 << 24))
    );
}

#[test]
fn ring_layout_rejects_overlaps() {
    let overlap = |first, second| RingLayoutError::Overlap { first, second };
    assert_eq!(
        RingLayout::validate(0, 0, 64, 4, 4096),
        Err(overlap("head", "tail"))
    );
    assert_eq!(
        RingLayout::validate(64, 0, 64, 4, 4096),
        Err(overlap("head", "rqes"))
    );
    assert_eq!(
        RingLayout::validate(0, 124, 64, 4, 4096),
        Err(overlap("tail", "rqes"))
    );
    assert!(
        RingLayout::validate(0, 128, 64, 4, 4096).is_ok(),
        "right after the entries"
    );
}

#[test]
fn ring_layout_rejects_unusable_sizes() {
    for entries in [0, 3, MAX_RING_ENTRIES * 2] {
        assert_eq!(
            RingLayout::validate(0, 4, 64, entries, 1 << 30),
            Err(RingLayoutError::Entries(RingSizeError { entries }))
        );
    }
}
