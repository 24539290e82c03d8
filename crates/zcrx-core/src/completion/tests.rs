use super::*;
use crate::user_data::{StreamSlots, KIND_SHIFT};

const CHUNK: u32 = 4096;
const CHUNKS: u64 = 16;
const TOKEN: u64 = 1 << IORING_ZCRX_AREA_SHIFT; // the second area's token

fn area() -> AreaLayout {
    AreaLayout::new(CHUNKS * u64::from(CHUNK), CHUNK, TOKEN).unwrap()
}

/// A stream table with one live stream (slot 0) and one freed slot (1).
fn streams() -> (StreamSlots, StreamId, StreamId) {
    let mut slots = StreamSlots::new();
    let live = slots.allocate();
    let closed = slots.allocate();
    assert!(slots.release(closed));
    (slots, live, closed)
}

fn recv(stream: StreamId, res: i32, flags: u32, off: u64) -> RawCompletion {
    RawCompletion {
        user_data: UserData::recv(stream).as_u64(),
        res,
        flags,
        big_cqe: [off, 0],
    }
}

fn data(stream: StreamId, area_offset: u64, len: u32) -> RawCompletion {
    recv(stream, len as i32, IORING_CQE_F_MORE, TOKEN | area_offset)
}

fn reason(result: Result<Completion, InvalidCompletion>) -> InvalidReason {
    result.expect_err("expected a rejection").reason
}

#[test]
fn area_layout_checks_its_inputs() {
    let layout = area();
    assert_eq!(layout.size(), 16 * 4096);
    assert_eq!(layout.chunk_size(), 4096);
    assert_eq!(layout.chunk_count(), 16);
    assert_eq!(layout.token(), TOKEN);
    assert_eq!(layout.chunk_index(0), Some(0));
    assert_eq!(layout.chunk_index(4095), Some(0));
    assert_eq!(layout.chunk_index(4096 * 15 + 1), Some(15));
    assert_eq!(layout.chunk_index(4096 * 16), None);
    assert_eq!(layout.refill_entry(4096 + 5, 9).off, TOKEN | (4096 + 5));

    assert_eq!(
        AreaLayout::new(4096, 3000, 0),
        Err(AreaLayoutError::ChunkSize(3000))
    );
    assert_eq!(
        AreaLayout::new(4096, 0, 0),
        Err(AreaLayoutError::ChunkSize(0))
    );
    assert_eq!(AreaLayout::new(0, 4096, 0), Err(AreaLayoutError::Length(0)));
    assert_eq!(
        AreaLayout::new(6000, 4096, 0),
        Err(AreaLayoutError::Length(6000))
    );
    let too_big = (1 << IORING_ZCRX_AREA_SHIFT) + 4096;
    assert_eq!(
        AreaLayout::new(too_big, 4096, 0),
        Err(AreaLayoutError::Length(too_big))
    );
    let too_many_chunks = 1u64 << 33;
    assert_eq!(
        AreaLayout::new(too_many_chunks, 1, 0),
        Err(AreaLayoutError::Length(too_many_chunks))
    );
    assert_eq!(
        AreaLayout::new(4096, 4096, 5),
        Err(AreaLayoutError::Token(5))
    );
    assert!(
        AreaLayout::new(4096, 4096, 0).is_ok(),
        "the first area's token is 0"
    );
    assert!(AreaLayoutError::Token(5).to_string().contains("0x5"));
}

#[test]
fn data_completion_decodes() {
    let (slots, live, _) = streams();
    let decoded = decode(&data(live, 3 * 4096 + 100, 200), &area(), &slots).unwrap();
    assert_eq!(
        decoded,
        Completion::Data {
            stream: live,
            area_offset: 3 * 4096 + 100,
            len: 200,
            chunk: 3,
            area: (TOKEN >> IORING_ZCRX_AREA_SHIFT) as u16,
            more: true,
        }
    );
}

#[test]
fn data_may_fill_a_chunk_exactly() {
    let (slots, live, _) = streams();
    for (offset, len) in [(0, CHUNK), (15 * 4096, CHUNK), (4096 + 4000, 96)] {
        let decoded = decode(&data(live, offset, len), &area(), &slots);
        assert!(
            matches!(decoded, Ok(Completion::Data { len: l, .. }) if l == len),
            "{offset} {len}: {decoded:?}"
        );
    }
}

#[test]
fn data_without_more_ends_the_request() {
    let (slots, live, _) = streams();
    let raw = recv(live, 10, 0, TOKEN | 8192);
    assert!(matches!(
        decode(&raw, &area(), &slots),
        Ok(Completion::Data {
            more: false,
            chunk: 2,
            ..
        })
    ));
}

#[test]
fn final_completions_decode_with_their_action() {
    let (slots, live, _) = streams();
    let end = |res| decode(&recv(live, res, 0, 0), &area(), &slots).unwrap();
    assert_eq!(
        end(0),
        Completion::End {
            stream: live,
            result: Ok(Eof)
        }
    );
    let action = |res| match end(res) {
        Completion::End {
            result: Err(errno), ..
        } => {
            assert_eq!(errno.raw(), -res);
            errno.recv_action()
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(
        action(-libc::ENOSPC),
        RecvErrorAction::ResubmitAfterCqDrained
    );
    assert_eq!(action(-libc::ENOMEM), RecvErrorAction::ResubmitAfterRefill);
    assert_eq!(action(-libc::EINTR), RecvErrorAction::ResubmitNow);
    assert_eq!(action(-libc::ECANCELED), RecvErrorAction::Cancelled);
    for fatal in [
        libc::ECONNRESET,
        libc::EFAULT,
        libc::ENOTCONN,
        libc::EINVAL,
        libc::ENOBUFS,
    ] {
        assert_eq!(action(-fatal), RecvErrorAction::Fatal);
    }
    // i32::MIN has no negation; it still decodes.
    assert!(matches!(
        end(i32::MIN),
        Completion::End { result: Err(_), .. }
    ));
    let errno = CqeErrno::new(libc::ENOMEM);
    assert_eq!(io::Error::from(errno).raw_os_error(), Some(libc::ENOMEM));
    assert!(!errno.to_string().is_empty());
}

#[test]
fn events_decode_by_type_index() {
    let (slots, _, _) = streams();
    let event = |res| {
        let raw = RawCompletion {
            user_data: UserData::EVENT.as_u64(),
            res,
            flags: 0,
            big_cqe: [0; 2],
        };
        decode(&raw, &area(), &slots)
    };
    // res 0 is ALLOC_FAIL, a real event.
    assert_eq!(
        event(0),
        Ok(Completion::Event {
            kind: ZcrxEventType::AllocFail
        })
    );
    assert_eq!(
        event(1),
        Ok(Completion::Event {
            kind: ZcrxEventType::Copy
        })
    );
    assert_eq!(
        event(9),
        Ok(Completion::Event {
            kind: ZcrxEventType::Unknown(9)
        })
    );
    let odd_event = RawCompletion {
        user_data: UserData::EVENT.as_u64() | 1,
        ..RawCompletion::default()
    };
    assert_eq!(
        reason(decode(&odd_event, &area(), &slots)),
        InvalidReason::UnknownUserData
    );
}

#[test]
fn other_kinds_pass_through() {
    let (slots, live, closed) = streams();
    let wake = RawCompletion {
        user_data: UserData::new(UserDataKind::Wake, 77).unwrap().as_u64(),
        res: 8,
        flags: 0,
        big_cqe: [0; 2],
    };
    assert_eq!(
        decode(&wake, &area(), &slots),
        Ok(Completion::Wake {
            payload: 77,
            res: 8
        })
    );
    let internal = RawCompletion {
        user_data: UserData::new(UserDataKind::Internal, 5).unwrap().as_u64(),
        res: -libc::ETIME,
        flags: IORING_CQE_F_MORE,
        big_cqe: [0; 2],
    };
    assert_eq!(
        decode(&internal, &area(), &slots),
        Ok(Completion::Internal {
            payload: 5,
            res: -libc::ETIME,
            flags: IORING_CQE_F_MORE
        })
    );
    // A cancel's completion names its target even after that stream is gone.
    for stream in [live, closed] {
        let cancel = RawCompletion {
            user_data: UserData::cancel(stream).as_u64(),
            res: -libc::ENOENT,
            ..RawCompletion::default()
        };
        assert_eq!(
            decode(&cancel, &area(), &slots),
            Ok(Completion::CancelDone {
                stream,
                res: -libc::ENOENT
            })
        );
    }
}

#[test]
fn unknown_user_data_is_rejected() {
    let (slots, _, _) = streams();
    for user_data in [0, 6 << KIND_SHIFT, u64::MAX, 0x00ff_ffff_ffff_ffff] {
        let raw = RawCompletion {
            user_data,
            res: 100,
            flags: IORING_CQE_F_MORE,
            big_cqe: [TOKEN, 0],
        };
        let err = decode(&raw, &area(), &slots).unwrap_err();
        assert_eq!(err.reason, InvalidReason::UnknownUserData);
        assert_eq!(err.stream(), None);
        assert_eq!(err.owed_refill(), None, "not a receive: nothing owed");
        assert!(!err.may_leak_chunk(), "not a receive: no chunk to leak");
    }
}

#[test]
fn foreign_area_token_is_rejected_and_leaked_not_returned() {
    let (slots, live, _) = streams();
    for foreign in [0, 2 << IORING_ZCRX_AREA_SHIFT, IORING_ZCRX_AREA_MASK] {
        let raw = recv(live, 64, IORING_CQE_F_MORE, foreign | 4096);
        let err = decode(&raw, &area(), &slots).unwrap_err();
        assert_eq!(
            err.reason,
            InvalidReason::ForeignAreaToken {
                found: foreign,
                areas: 1
            }
        );
        // Not one of this area's chunks: returning it could free a chunk a live buffer
        // reads, so it is leaked (and counted by the runtime).
        assert_eq!(err.owed_refill(), None);
        assert!(err.may_leak_chunk());
        assert_eq!(err.stream(), Some(live));
    }
}

#[test]
fn data_outside_the_area_is_rejected() {
    let (slots, live, _) = streams();
    let size = CHUNKS * u64::from(CHUNK);
    for (offset, len) in [(size, 1), (size - 10, 11), (0xffff_ffff_ffff, 1)] {
        let err = decode(&data(live, offset, len), &area(), &slots).unwrap_err();
        assert_eq!(
            err.reason,
            InvalidReason::OutOfArea {
                area_offset: offset,
                len
            }
        );
        assert_eq!(err.owed_refill(), None, "outside the area: leaked");
        assert!(err.may_leak_chunk());
    }
}

#[test]
fn data_across_a_chunk_boundary_is_rejected() {
    let (slots, live, _) = streams();
    for (offset, len) in [(4000, 97), (4096 + 1, CHUNK), (0, CHUNK + 1)] {
        let err = decode(&data(live, offset, len), &area(), &slots).unwrap_err();
        assert_eq!(
            err.reason,
            InvalidReason::StraddlesChunk {
                area_offset: offset,
                len
            }
        );
        assert_eq!(err.owed_refill(), None, "which chunk is unclear: leaked");
        assert!(err.may_leak_chunk());
    }
}

#[test]
fn more_without_data_is_rejected() {
    let (slots, live, _) = streams();
    let empty = decode(&recv(live, 0, IORING_CQE_F_MORE, TOKEN), &area(), &slots).unwrap_err();
    assert_eq!(empty.reason, InvalidReason::EmptyData);
    // The kernel never posts this for a chunk it lent out: no reference is known to exist.
    assert_eq!(empty.owed_refill(), None);
    assert!(empty.may_leak_chunk());

    let error = decode(
        &recv(live, -libc::EIO, IORING_CQE_F_MORE, TOKEN),
        &area(),
        &slots,
    )
    .unwrap_err();
    assert_eq!(error.reason, InvalidReason::ErrorWithMore);
    assert_eq!(error.owed_refill(), None);
    assert!(!error.may_leak_chunk(), "an error carries no chunk");
}

#[test]
fn stale_streams_are_rejected_and_their_data_owed_back() {
    let (slots, live, closed) = streams();
    // The closed stream's slot is free.
    let err = decode(&data(closed, 4096, 10), &area(), &slots).unwrap_err();
    assert_eq!(
        err.reason,
        InvalidReason::StaleStream {
            current_generation: None
        }
    );
    assert_eq!(err.stream(), Some(closed));
    assert_eq!(
        err.owed_refill(),
        Some(area().refill_entry(4096, 10)),
        "a late, well-formed data CQE still holds a reference"
    );
    assert!(!err.may_leak_chunk());
    // Without F_MORE too: data is data.
    let err = decode(&recv(closed, 10, 0, TOKEN | 4096), &area(), &slots).unwrap_err();
    assert_eq!(err.owed_refill(), Some(area().refill_entry(4096, 10)));

    // An older generation of a live slot.
    let old = StreamId::new(live.slot(), live.generation().wrapping_sub(1));
    let err = decode(&recv(old, 0, 0, 0), &area(), &slots).unwrap_err();
    assert_eq!(
        err.reason,
        InvalidReason::StaleStream {
            current_generation: Some(live.generation())
        }
    );
    assert_eq!(err.owed_refill(), None, "a final CQE carries no chunk");
    assert!(!err.may_leak_chunk());

    // A slot the table has never seen.
    let never = StreamId::new(1000, 0);
    assert!(matches!(
        reason(decode(
            &recv(never, -libc::ECONNRESET, 0, 0),
            &area(),
            &slots
        )),
        InvalidReason::StaleStream {
            current_generation: None
        }
    ));
}

#[test]
fn corrupt_data_is_reported_before_staleness() {
    let (slots, _, closed) = streams();
    let err = decode(&data(closed, 4000, 200), &area(), &slots).unwrap_err();
    assert!(matches!(err.reason, InvalidReason::StraddlesChunk { .. }));
    // Corrupt data of a stale stream is not returned either.
    assert_eq!(err.owed_refill(), None);
}

#[test]
fn invalid_completions_display() {
    let (slots, live, closed) = streams();
    let cases = [
        RawCompletion::default(),
        data(closed, 0, 1),
        recv(StreamId::new(live.slot(), 9), 0, 0, 0),
        recv(live, 1, IORING_CQE_F_MORE, 0),
        data(live, 1 << 40, 1),
        data(live, 4095, 2),
        recv(live, 0, IORING_CQE_F_MORE, TOKEN),
        recv(live, -1, IORING_CQE_F_MORE, TOKEN),
    ];
    for raw in cases {
        let err = decode(&raw, &area(), &slots).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("invalid completion"), "{text}");
    }
}

/// Deterministic xorshift64*, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Mostly values near interesting boundaries, sometimes anything.
    fn pick(&mut self, interesting: &[u64]) -> u64 {
        let r = self.next();
        if r % 4 == 0 {
            self.next()
        } else {
            let base = interesting[(r >> 8) as usize % interesting.len()];
            base.wrapping_add((r >> 32) % 3).wrapping_sub(1)
        }
    }
}

#[test]
fn random_completions_never_panic_and_accepted_data_is_in_bounds() {
    let layout = area();
    let mut slots = StreamSlots::new();
    let streams: Vec<_> = (0..4).map(|_| slots.allocate()).collect();
    assert!(slots.release(streams[3]));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let user_data_values: Vec<u64> = streams
        .iter()
        .map(|s| UserData::recv(*s).as_u64())
        .chain([
            UserData::EVENT.as_u64(),
            UserData::cancel(streams[0]).as_u64(),
            UserData::new(UserDataKind::Wake, 1).unwrap().as_u64(),
            0,
            u64::MAX,
        ])
        .collect();
    let size = layout.size();
    let offsets = [
        0,
        4096,
        4095,
        size - 1,
        size,
        TOKEN,
        TOKEN + 4096,
        TOKEN + size,
    ];
    let results = [0, 1, 4096, 4097, i32::MAX as u64, (-libc::ENOMEM) as u64];
    let mut accepted = 0;
    for _ in 0..200_000 {
        let raw = RawCompletion {
            user_data: rng.pick(&user_data_values),
            res: rng.pick(&results) as i32,
            flags: rng.next() as u32 & (IORING_CQE_F_MORE | 1 << 15),
            big_cqe: [rng.pick(&offsets), rng.next()],
        };
        match decode(&raw, &layout, &slots) {
            Ok(Completion::Data {
                area_offset,
                len,
                chunk,
                ..
            }) => {
                accepted += 1;
                assert!(len > 0);
                let end = area_offset + u64::from(len);
                assert!(end <= size, "{raw:?}");
                assert_eq!(layout.chunk_index(area_offset), Some(chunk));
                assert_eq!(layout.chunk_index(end - 1), Some(chunk), "{raw:?}");
            }
            Ok(_) => {}
            Err(err) => {
                let _ = err.to_string();
                if let Some(owed) = err.owed_refill() {
                    // Only well-formed data of a gone stream is returned, and only for a
                    // chunk of this area.
                    assert!(
                        matches!(err.reason, InvalidReason::StaleStream { .. }),
                        "{err}"
                    );
                    assert_eq!(owed.__pad, 0);
                    assert_eq!(owed.off, raw.big_cqe[0]);
                    let area_offset = owed.off & !IORING_ZCRX_AREA_MASK;
                    assert_eq!(owed.off & IORING_ZCRX_AREA_MASK, layout.token());
                    assert!(area_offset + u64::from(owed.len) <= size, "{raw:?}");
                    assert!(!err.may_leak_chunk());
                }
            }
        }
    }
    assert!(
        accepted > 1000,
        "the generator should hit valid data: {accepted}"
    );
}

#[test]
fn an_area_set_finds_each_area_by_its_token() {
    let (slots, live, _) = streams();
    let mut areas = AreaSet::new(AreaLayout::new(16 * 4096, 4096, 0).unwrap());
    let second = 1 << IORING_ZCRX_AREA_SHIFT;
    assert_eq!(
        areas.push(AreaLayout::new(4 * 4096, 4096, second).unwrap()),
        Ok(1)
    );
    assert_eq!(areas.total_size(), 20 * 4096);
    // The second area's chunk 3 is inside it; its chunk 4 is not (it has 4), although the
    // first area's offset 4 * 4096 would be.
    let decoded = decode(&recv(live, 10, IORING_CQE_F_MORE, 0), &areas, &slots);
    assert!(
        matches!(
            decoded,
            Ok(Completion::Data {
                area: 0,
                chunk: 0,
                ..
            })
        ),
        "{decoded:?}"
    );
    let decoded = decode(
        &recv(live, 10, IORING_CQE_F_MORE, second | (3 * 4096)),
        &areas,
        &slots,
    );
    assert!(
        matches!(
            decoded,
            Ok(Completion::Data {
                area: 1,
                chunk: 3,
                ..
            })
        ),
        "{decoded:?}"
    );
    let err = decode(
        &recv(live, 10, IORING_CQE_F_MORE, second | (4 * 4096)),
        &areas,
        &slots,
    )
    .unwrap_err();
    assert!(
        matches!(err.reason, InvalidReason::OutOfArea { .. }),
        "{err}"
    );
    // A third area's token before it is added.
    let third = 2 << IORING_ZCRX_AREA_SHIFT;
    let err = decode(&recv(live, 10, IORING_CQE_F_MORE, third), &areas, &slots).unwrap_err();
    assert_eq!(
        err.reason,
        InvalidReason::ForeignAreaToken {
            found: third,
            areas: 2
        }
    );
    assert!(
        err.to_string().contains("none of the 2 registered areas"),
        "{err}"
    );
    assert_eq!(err.owed_refill(), None);
}

#[test]
fn an_area_set_takes_only_the_kernels_next_area() {
    let mut areas = AreaSet::new(AreaLayout::new(16 * 4096, 4096, 0).unwrap());
    let skipped = 2 << IORING_ZCRX_AREA_SHIFT;
    assert_eq!(
        areas.push(AreaLayout::new(4096 * 2, 4096, skipped).unwrap()),
        Err(AddAreaError::UnexpectedToken {
            token: skipped,
            expected: 1 << IORING_ZCRX_AREA_SHIFT
        })
    );
    let next = 1 << IORING_ZCRX_AREA_SHIFT;
    assert_eq!(
        areas.push(AreaLayout::new(8192 * 2, 8192, next).unwrap()),
        Err(AddAreaError::ChunkSize {
            found: 8192,
            expected: 4096
        })
    );
    for id in 1..MAX_AREAS {
        let token = u64::from(id) << IORING_ZCRX_AREA_SHIFT;
        assert_eq!(
            areas.push(AreaLayout::new(8192, 4096, token).unwrap()),
            Ok(id as u16)
        );
    }
    let token = u64::from(MAX_AREAS) << IORING_ZCRX_AREA_SHIFT;
    assert_eq!(
        areas.push(AreaLayout::new(8192, 4096, token).unwrap()),
        Err(AddAreaError::Full)
    );
    assert_eq!(areas.count(), MAX_AREAS);
    assert!(areas.get(1023).is_some() && areas.get(1024).is_none());
}
