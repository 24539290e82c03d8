//! The receive state machine driven by synthetic completions.

use super::*;

const KIB4: u32 = 4096;

fn errno(e: i32) -> RequestEnd {
    RequestEnd::Error(CqeErrno::new(e))
}

const REMOVE: Action = Action::Remove {
    was_waiting_for_buffers: false,
};

#[test]
fn an_unlimited_stream_runs_one_request_to_eof() {
    let mut s = StreamReceive::new(None);
    assert_eq!(s.request(), Request::Idle);
    assert_eq!(s.start(), Action::Submit { len: 0 });
    assert!(s.request_is_live());
    for _ in 0..100 {
        assert!(s.on_data(KIB4));
    }
    // No limit: however much came, EOF is the peer's.
    assert_eq!(s.on_end(RequestEnd::Eof), Action::Finish(Finish::Eof));
    assert!(s.is_finished());
    assert!(!s.request_is_live());
    // Nothing more is asked of the kernel for it.
    assert_eq!(s.read_more(), Action::None);
    assert_eq!(s.close(), REMOVE);
}

#[test]
fn a_limited_stream_waits_for_its_reader_between_grants() {
    let mut s = StreamReceive::new(Some(3 * KIB4));
    assert_eq!(s.start(), Action::None, "starts when the reader asks");
    assert_eq!(s.read_more(), Action::Submit { len: 3 * KIB4 });
    // Asking again while the request runs changes nothing.
    assert_eq!(s.read_more(), Action::None);
    for _ in 0..3 {
        assert!(s.on_data(KIB4));
    }
    // The request ends at its limit: not EOF, the reader is told its grant is used.
    assert_eq!(s.on_end(RequestEnd::Eof), Action::GrantUsedUp);
    assert!(!s.is_finished());
    assert_eq!(s.request(), Request::Idle);
    // The next grant is whole again.
    assert_eq!(s.read_more(), Action::Submit { len: 3 * KIB4 });
    assert!(s.on_data(KIB4));
    // Less than the grant, then a 0: that is the peer's EOF.
    assert_eq!(s.on_end(RequestEnd::Eof), Action::Finish(Finish::Eof));
    assert!(s.is_finished());
}

#[test]
fn a_limited_stream_resubmitted_asks_only_for_the_rest_of_its_grant() {
    let mut s = StreamReceive::new(Some(4 * KIB4));
    assert_eq!(s.read_more(), Action::Submit { len: 4 * KIB4 });
    assert!(s.on_data(KIB4));
    assert_eq!(
        s.on_end(errno(libc::EINTR)),
        Action::Submit { len: 3 * KIB4 }
    );
    assert!(s.on_data(2 * KIB4));
    assert_eq!(s.on_end(errno(libc::ENOMEM)), Action::WaitForBuffers);
    assert_eq!(s.request(), Request::WaitingForBuffers);
    assert_eq!(s.submit(), Action::Submit { len: KIB4 });
    assert!(s.on_data(KIB4));
    // The last byte arrived, then the request ended for lack of CQ space: the resubmission
    // after the drain finds the grant used up and asks the kernel for nothing.
    assert_eq!(
        s.on_end(errno(libc::ENOSPC)),
        Action::ResubmitAfterCqDrained
    );
    assert_eq!(s.request(), Request::ResubmitAfterCq);
    assert_eq!(s.submit(), Action::GrantUsedUp);
    assert_eq!(s.request(), Request::Idle);
    assert_eq!(s.read_more(), Action::Submit { len: 4 * KIB4 });
}

#[test]
fn data_without_more_ends_the_request_and_it_goes_on() {
    let mut s = StreamReceive::new(None);
    assert_eq!(s.start(), Action::Submit { len: 0 });
    assert!(s.on_data(KIB4));
    // No F_MORE and no reason given: a new request, as after EINTR.
    assert_eq!(s.on_end(RequestEnd::Unexplained), Action::Submit { len: 0 });
    assert!(!s.is_finished());

    // On a limited stream whose grant it used up, the reader is asked instead.
    let mut s = StreamReceive::new(Some(KIB4));
    assert_eq!(s.read_more(), Action::Submit { len: KIB4 });
    assert!(s.on_data(KIB4));
    assert_eq!(s.on_end(RequestEnd::Unexplained), Action::GrantUsedUp);
    // And one with grant left asks for the rest.
    let mut s = StreamReceive::new(Some(2 * KIB4));
    assert_eq!(s.read_more(), Action::Submit { len: 2 * KIB4 });
    assert!(s.on_data(KIB4));
    assert_eq!(
        s.on_end(RequestEnd::Unexplained),
        Action::Submit { len: KIB4 }
    );
}

#[test]
fn an_error_completion_finishes_the_stream_with_the_kernels_errno() {
    for e in [libc::ECONNRESET, libc::EFAULT, libc::ECANCELED] {
        let mut s = StreamReceive::new(None);
        assert_eq!(s.start(), Action::Submit { len: 0 });
        assert_eq!(
            s.on_end(errno(e)),
            Action::Finish(Finish::Error(CqeErrno::new(e)))
        );
        assert!(s.is_finished());
        assert_eq!(s.read_more(), Action::None);
    }
}

#[test]
fn errors_the_runtime_answers_resubmit() {
    let mut s = StreamReceive::new(None);
    assert_eq!(s.start(), Action::Submit { len: 0 });
    assert_eq!(s.on_end(errno(libc::EINTR)), Action::Submit { len: 0 });
    assert_eq!(
        s.on_end(errno(libc::ENOSPC)),
        Action::ResubmitAfterCqDrained
    );
    assert_eq!(s.submit(), Action::Submit { len: 0 });
    assert_eq!(s.on_end(errno(libc::ENOMEM)), Action::WaitForBuffers);
    assert!(!s.request_is_live());
    assert_eq!(s.submit(), Action::Submit { len: 0 });
    assert!(!s.is_finished());
}

#[test]
fn closing_while_a_request_runs_cancels_it_and_the_final_cqe_removes_it() {
    let mut s = StreamReceive::new(None);
    assert_eq!(s.start(), Action::Submit { len: 0 });
    assert_eq!(s.close(), Action::Cancel);
    assert_eq!(s.request(), Request::Cancelling);
    assert!(
        s.request_is_live(),
        "the socket stays open until the kernel lets go"
    );
    // A second close (or shutdown) cancels nothing twice.
    assert_eq!(s.cancel_or_remove(), Action::None);
    // Data still in flight goes nowhere: its buffer is dropped, returning the chunk.
    assert!(!s.on_data(KIB4));
    // A cancel CQE other than -ENOENT: the receive's final CQE follows.
    assert_eq!(s.on_cancel_done(0), Action::None);
    assert_eq!(s.on_end(errno(libc::ECANCELED)), REMOVE);
    assert!(!s.request_is_live());
}

#[test]
fn a_cancel_answered_enoent_removes_the_stream() {
    let mut s = StreamReceive::new(None);
    assert_eq!(s.start(), Action::Submit { len: 0 });
    assert_eq!(s.close(), Action::Cancel);
    // The receive was gone already: no final CQE will come for it.
    assert_eq!(s.on_cancel_done(-libc::ENOENT), REMOVE);
    assert_eq!(s.request(), Request::Idle);
    // An ENOENT for a stream that is not cancelling means nothing.
    let mut s = StreamReceive::new(None);
    assert_eq!(s.start(), Action::Submit { len: 0 });
    assert_eq!(s.on_cancel_done(-libc::ENOENT), Action::None);
    assert_eq!(s.request(), Request::Running);
}

#[test]
fn closing_without_a_request_removes_at_once() {
    let mut s = StreamReceive::new(Some(KIB4));
    assert_eq!(s.close(), REMOVE);

    let mut s = StreamReceive::new(None);
    assert_eq!(s.start(), Action::Submit { len: 0 });
    assert_eq!(s.on_end(errno(libc::ENOMEM)), Action::WaitForBuffers);
    // It no longer waits for buffers: the runtime's count goes down.
    assert_eq!(
        s.close(),
        Action::Remove {
            was_waiting_for_buffers: true
        }
    );

    let mut s = StreamReceive::new(None);
    assert_eq!(s.start(), Action::Submit { len: 0 });
    assert_eq!(
        s.on_end(errno(libc::ENOSPC)),
        Action::ResubmitAfterCqDrained
    );
    assert_eq!(s.close(), REMOVE);
}

#[test]
fn a_stream_ended_by_the_runtime_keeps_its_entry_until_the_reader_lets_go() {
    // An invalid completion ends the stream and cancels its request.
    let mut s = StreamReceive::new(None);
    assert_eq!(s.start(), Action::Submit { len: 0 });
    assert!(s.finish(), "the reader is told once");
    assert!(!s.finish());
    assert_eq!(s.cancel(), Action::Cancel);
    // The cancelled request's end removes it (the reader was told already).
    assert_eq!(s.on_end(errno(libc::ECANCELED)), REMOVE);

    // Ended while no request ran: nothing to cancel, and a late end changes nothing.
    let mut s = StreamReceive::new(Some(KIB4));
    assert!(s.finish());
    assert_eq!(s.cancel(), Action::None);
    assert_eq!(s.read_more(), Action::None);
    assert_eq!(s.on_end(RequestEnd::Eof), Action::None);
    assert_eq!(s.close(), REMOVE);
}

#[test]
fn shutdown_cancels_running_requests_and_removes_the_rest() {
    let mut running = StreamReceive::new(None);
    assert_eq!(running.start(), Action::Submit { len: 0 });
    assert!(running.finish());
    assert_eq!(running.cancel_or_remove(), Action::Cancel);
    assert_eq!(running.on_end(errno(libc::ECANCELED)), REMOVE);

    let mut idle = StreamReceive::new(Some(KIB4));
    assert!(idle.finish());
    assert_eq!(idle.cancel_or_remove(), REMOVE);
}

fn holding(high: u64, held: u64) -> Option<Holding> {
    Some(Holding {
        budget: Budget::new(high),
        held,
        granule: u64::from(KIB4),
        fill: u64::from(KIB4),
    })
}

#[test]
fn requests_ask_for_what_the_chunks_of_the_last_request_carried() {
    // Expected 1,460 bytes per chunk (an MTU of 1,500) before anything arrived.
    let expecting = |held: u64| {
        Some(Holding {
            budget: Budget::new(8 * 4096),
            held,
            granule: u64::from(KIB4),
            fill: 1460,
        })
    };
    let mut s = StreamReceive::new(None);
    s.set_holding(expecting(0));
    assert_eq!(s.start(), Action::Submit { len: 8 * 1460 });
    // The segments carry 1,448 bytes each (timestamps): 8 chunks and 96 bytes of a ninth.
    for _ in 0..8 {
        assert!(s.on_data(1448));
    }
    assert!(s.on_data(96));
    // The reader dropped them all. The request ended at its limit, so the kernel cut its
    // last segment short: the next request expects what the whole ones carried.
    s.set_holding(expecting(0));
    assert_eq!(s.on_end(RequestEnd::Eof), Action::Submit { len: 8 * 1448 });
    // Tiny segments (an RPC peer): the next request shrinks to as many of them.
    for _ in 0..100 {
        assert!(s.on_data(64));
    }
    s.set_holding(expecting(0));
    assert_eq!(s.on_end(errno(libc::EINTR)), Action::Submit { len: 8 * 64 });
    // Full chunks again (a bulk sender): a request cut short in its first chunk says a
    // chunk carries more than that; the estimate grows until the requests end in whole
    // chunks, never above a chunk each.
    assert!(s.on_data(8 * 64));
    s.set_holding(expecting(1));
    assert_eq!(s.on_end(RequestEnd::Eof), Action::Submit { len: 7 * 512 });
    assert!(s.on_data(7 * 512));
    s.set_holding(expecting(0));
    assert_eq!(s.on_end(RequestEnd::Eof), Action::Submit { len: 8 * 3584 });
    assert!(s.on_data(KIB4));
    assert!(s.on_data(KIB4));
    s.set_holding(expecting(0));
    // Interrupted after two whole chunks (EINTR), not cut short: their average counts.
    assert_eq!(
        s.on_end(errno(libc::EINTR)),
        Action::Submit { len: 8 * KIB4 }
    );
    for _ in 0..8 {
        assert!(s.on_data(KIB4));
    }
    s.set_holding(expecting(0));
    assert_eq!(s.on_end(RequestEnd::Eof), Action::Submit { len: 8 * KIB4 });
    // A request that ended without data (ENOMEM at once) keeps the last estimate.
    s.set_holding(expecting(0));
    assert_eq!(s.on_end(errno(libc::ENOMEM)), Action::WaitForBuffers);
    assert_eq!(s.submit(), Action::Submit { len: 8 * KIB4 });
}

#[test]
fn a_budgeted_stream_asks_for_its_room_and_pauses_at_high() {
    let mut s = StreamReceive::new(None);
    s.set_holding(holding(8 * 4096, 0));
    assert_eq!(s.start(), Action::Submit { len: 8 * KIB4 });
    for _ in 0..3 {
        assert!(s.on_data(KIB4));
    }
    // Interrupted after 3 chunks while the reader holds them: the room is 5 chunks.
    s.set_holding(holding(8 * 4096, 3 * 4096));
    assert_eq!(
        s.on_end(errno(libc::EINTR)),
        Action::Submit { len: 5 * KIB4 }
    );
    for _ in 0..5 {
        assert!(s.on_data(KIB4));
    }
    // The request ends at its limit (a final 0, as at EOF): not the peer's EOF.
    s.set_holding(holding(8 * 4096, 8 * 4096));
    assert_eq!(s.on_end(RequestEnd::Eof), Action::Pause);
    assert!(s.is_paused());
    assert!(!s.request_is_live());
    // Nothing the reader or the kernel says starts it while it holds more than low.
    assert_eq!(s.read_more(), Action::None);
    s.set_holding(holding(8 * 4096, 5 * 4096));
    assert_eq!(s.resume(), Action::None);
    assert!(s.is_paused());
    // Back at low (half): it asks for its room again.
    s.set_holding(holding(8 * 4096, 4 * 4096));
    assert_eq!(s.resume(), Action::Submit { len: 4 * KIB4 });
    assert!(!s.is_paused());
    // A peer's EOF before the limit is EOF.
    assert!(s.on_data(KIB4));
    assert_eq!(s.on_end(RequestEnd::Eof), Action::Finish(Finish::Eof));
}

/// The defect this guards against: a stream paused at `high`, whose reader drops to between
/// `low` and `high` and then waits for more (a decoder holding part of a message), waited
/// for a drop that never came while its reader waited for bytes that never came.
#[test]
fn a_waiting_reader_resumes_its_stream_below_high_and_only_until_the_next_pause() {
    let mut s = StreamReceive::new(None);
    s.set_holding(holding(8 * 4096, 8 * 4096));
    assert_eq!(s.start(), Action::Pause);
    assert_eq!(s.resume_mark(), Some(4 * 4096), "low, half the budget");
    // Its reader waits while holding the whole budget: nothing yet, but the next drop
    // resumes it.
    assert_eq!(s.reader_waiting(), Action::None);
    assert!(s.is_paused());
    assert_eq!(s.resume_mark(), Some(8 * 4096 - 1));
    s.set_holding(holding(8 * 4096, 7 * 4096));
    assert_eq!(s.resume(), Action::Submit { len: KIB4 });
    assert!(!s.is_paused());
    assert_eq!(s.resume_mark(), None, "not paused");
    // The next pause is a new one: back to the low mark until the reader waits again.
    assert!(s.on_data(KIB4));
    s.set_holding(holding(8 * 4096, 8 * 4096));
    assert_eq!(s.on_end(RequestEnd::Eof), Action::Pause);
    assert_eq!(s.resume_mark(), Some(4 * 4096));
    s.set_holding(holding(8 * 4096, 6 * 4096));
    assert_eq!(
        s.resume(),
        Action::None,
        "above low, and its reader is not waiting"
    );
    // The reader waits, holding 6 of 8 chunks: it goes on at once, for its room.
    assert_eq!(s.reader_waiting(), Action::Submit { len: 2 * KIB4 });
    // A waiting reader means nothing to a stream that is not paused.
    assert_eq!(s.reader_waiting(), Action::None);
    assert!(s.request_is_live());
    // Nor to one without a budget.
    let mut s = StreamReceive::new(None);
    s.set_holding(None);
    assert_eq!(s.start(), Action::Submit { len: 0 });
    assert_eq!(s.reader_waiting(), Action::None);
    assert_eq!(s.resume_mark(), None);
}

#[test]
fn a_request_ending_at_its_limit_with_room_left_goes_on() {
    let mut s = StreamReceive::new(None);
    s.set_holding(holding(8 * 4096, 0));
    assert_eq!(s.start(), Action::Submit { len: 8 * KIB4 });
    for _ in 0..8 {
        assert!(s.on_data(KIB4));
    }
    // The reader dropped everything meanwhile: the next request asks for the whole budget.
    s.set_holding(holding(8 * 4096, 0));
    assert_eq!(s.on_end(RequestEnd::Eof), Action::Submit { len: 8 * KIB4 });
    // Data without F_MORE at the limit is the same.
    for _ in 0..8 {
        assert!(s.on_data(KIB4));
    }
    s.set_holding(holding(8 * 4096, 2 * 4096));
    assert_eq!(
        s.on_end(RequestEnd::Unexplained),
        Action::Submit { len: 6 * KIB4 }
    );
}

#[test]
fn the_smaller_of_a_grant_and_a_budget_wins() {
    let mut s = StreamReceive::new(Some(3 * KIB4));
    s.set_holding(holding(8 * 4096, 0));
    assert_eq!(s.start(), Action::None);
    // The grant is smaller.
    assert_eq!(s.read_more(), Action::Submit { len: 3 * KIB4 });
    for _ in 0..3 {
        assert!(s.on_data(KIB4));
    }
    s.set_holding(holding(8 * 4096, 7 * 4096));
    assert_eq!(s.on_end(RequestEnd::Eof), Action::GrantUsedUp);
    // Now the room is: one chunk.
    assert_eq!(s.read_more(), Action::Submit { len: KIB4 });
    assert!(s.on_data(KIB4));
    s.set_holding(holding(8 * 4096, 8 * 4096));
    // The budget's limit, with the grant not used up: pause, the grant waits.
    assert_eq!(s.on_end(RequestEnd::Eof), Action::Pause);
    s.set_holding(holding(8 * 4096, 0));
    assert_eq!(s.resume(), Action::Submit { len: 2 * KIB4 });
    // A paused stream whose grant is used up waits for its reader first.
    let mut s = StreamReceive::new(Some(KIB4));
    s.set_holding(holding(4096, 0));
    assert_eq!(s.read_more(), Action::Submit { len: KIB4 });
    assert!(s.on_data(KIB4));
    s.set_holding(holding(4096, 4096));
    assert_eq!(s.on_end(RequestEnd::Eof), Action::GrantUsedUp);
    assert_eq!(s.read_more(), Action::Pause);
}

#[test]
fn a_paused_stream_closes_at_once_and_an_ended_one_stops_being_paused() {
    let mut s = StreamReceive::new(None);
    s.set_holding(holding(4096, 4096));
    assert_eq!(s.start(), Action::Pause);
    assert_eq!(s.cancel(), Action::None, "no request to cancel");
    assert_eq!(s.close(), REMOVE);

    let mut s = StreamReceive::new(None);
    s.set_holding(holding(4096, 4096));
    assert_eq!(s.start(), Action::Pause);
    assert!(s.finish());
    s.set_holding(holding(4096, 0));
    assert_eq!(s.resume(), Action::None);
    assert!(!s.is_paused());
    assert_eq!(s.cancel_or_remove(), REMOVE);
}

#[test]
fn without_a_budget_nothing_changes() {
    let mut s = StreamReceive::new(None);
    s.set_holding(None);
    assert_eq!(s.start(), Action::Submit { len: 0 });
    assert_eq!(s.resume(), Action::None);
    for _ in 0..1000 {
        assert!(s.on_data(KIB4));
    }
    assert_eq!(s.on_end(RequestEnd::Eof), Action::Finish(Finish::Eof));
}
