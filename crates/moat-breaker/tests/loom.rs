//! The state word and the half-open slots, model-checked with loom over every interleaving:
//!
//! ```sh
//! RUSTFLAGS="--cfg moat_loom" CARGO_TARGET_DIR=target/loom cargo test -p moat-breaker --release --test loom
//! ```
#![cfg(moat_loom)]

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use moat_breaker::{Breaker, BreakerConfig, BreakerEvent, CallOutcome, State, Window};
use moat_core::clock::ManualClock;

/// A breaker that trips on one failure in a one-call window, lets `trials` through when
/// half-open, and counts its transitions.
fn breaker(trials: u32) -> (Breaker, ManualClock, Arc<AtomicUsize>) {
    let clock = ManualClock::new();
    let transitions = Arc::new(AtomicUsize::new(0));
    let seen = transitions.clone();
    let breaker = Breaker::builder("loom")
        .config(
            BreakerConfig::default()
                .with_window(Window::Count(2))
                .with_minimum_calls(2)
                .with_half_open_calls(trials)
                .with_jitter(0.0),
        )
        .clock(Arc::new(clock.clone()))
        .on_event(move |event| {
            if matches!(event, BreakerEvent::Transition { .. }) {
                seen.fetch_add(1, SeqCst);
            }
        })
        .build()
        .unwrap();
    (breaker, clock, transitions)
}

fn open_and_wait(breaker: &Breaker, clock: &ManualClock) {
    breaker.try_acquire().unwrap().record(CallOutcome::Failure);
    breaker.try_acquire().unwrap().record(CallOutcome::Failure);
    assert_eq!(breaker.state(), State::Open);
    clock.advance(Duration::from_secs(3600));
}

#[test]
fn two_failures_at_once_trip_the_breaker_exactly_once() {
    loom::model(|| {
        let (breaker, _, transitions) = breaker(1);
        let other = breaker.clone();
        let thread = loom::thread::spawn(move || {
            other.try_acquire().unwrap().record(CallOutcome::Failure);
        });
        breaker.try_acquire().unwrap().record(CallOutcome::Failure);
        thread.join().unwrap();
        assert_eq!(breaker.state(), State::Open);
        assert_eq!(transitions.load(SeqCst), 1);
    });
}

#[test]
fn an_open_breaker_admits_exactly_one_trial_to_two_callers() {
    loom::model(|| {
        let (breaker, clock, transitions) = breaker(1);
        open_and_wait(&breaker, &clock);
        let other = breaker.clone();
        let thread = loom::thread::spawn(move || other.try_acquire_owned().ok());
        let mine = breaker.try_acquire_owned().ok();
        let theirs = thread.join().unwrap();
        assert_eq!(
            usize::from(mine.is_some()) + usize::from(theirs.is_some()),
            1,
            "exactly one trial"
        );
        let trial = mine.or(theirs).unwrap();
        assert!(trial.is_trial());
        trial.record(CallOutcome::Success);
        assert_eq!(breaker.state(), State::Closed);
        // closed -> open -> half-open -> closed
        assert_eq!(transitions.load(SeqCst), 3);
    });
}

#[test]
fn trials_ending_at_once_decide_once() {
    loom::model(|| {
        let (breaker, clock, transitions) = breaker(2);
        open_and_wait(&breaker, &clock);
        let first = breaker.try_acquire_owned().unwrap();
        let second = breaker.try_acquire_owned().unwrap();
        assert!(breaker.try_acquire().is_err(), "both slots taken");
        let thread = loom::thread::spawn(move || first.record(CallOutcome::Failure));
        second.record(CallOutcome::Failure);
        thread.join().unwrap();
        assert_eq!(breaker.state(), State::Open);
        // closed -> open -> half-open -> open
        assert_eq!(transitions.load(SeqCst), 3);
    });
}

#[test]
fn a_dropped_trial_gives_its_slot_back_to_a_racing_caller() {
    loom::model(|| {
        let (breaker, clock, _) = breaker(1);
        open_and_wait(&breaker, &clock);
        let held = breaker.try_acquire_owned().unwrap();
        let other = breaker.clone();
        let thread = loom::thread::spawn(move || other.try_acquire_owned().ok());
        drop(held);
        match thread.join().unwrap() {
            // It came after the slot was given back: it is the one trial now.
            Some(trial) => {
                assert!(trial.is_trial());
                assert!(breaker.try_acquire().is_err());
            }
            // It came first and was refused: the slot is free again.
            None => assert!(breaker.try_acquire().is_ok()),
        }
        assert_eq!(breaker.state(), State::HalfOpen);
    });
}

#[test]
fn a_success_skipped_on_a_clean_window_never_hides_a_racing_failure() {
    loom::model(|| {
        let (breaker, _, _) = breaker(1);
        // A whole window of successes: the next success is not written.
        breaker.try_acquire().unwrap().record(CallOutcome::Success);
        breaker.try_acquire().unwrap().record(CallOutcome::Success);
        let other = breaker.clone();
        let thread = loom::thread::spawn(move || {
            // Refused if the failure already tripped the breaker.
            if let Ok(permit) = other.try_acquire() {
                permit.record(CallOutcome::Success);
            }
        });
        breaker.try_acquire().unwrap().record(CallOutcome::Failure);
        thread.join().unwrap();
        // Whatever the order, the window holds the failure and a success: half failed.
        assert_eq!(breaker.state(), State::Open);
    });
}
