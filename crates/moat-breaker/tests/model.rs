//! The breaker against a plain sequential model of the same rules, and its half-open slots
//! under real threads.

use std::collections::VecDeque;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use moat_breaker::{Breaker, BreakerConfig, CallOutcome, State, Window};
use moat_core::clock::ManualClock;
use proptest::prelude::*;

#[derive(Debug, Clone, Copy)]
enum Op {
    Succeed,
    Fail,
    /// Acquire and drop the permit without an outcome (a client that left).
    Abandon,
    /// Let this many seconds pass.
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Succeed),
        4 => Just(Op::Fail),
        1 => Just(Op::Abandon),
        2 => (1u64..15).prop_map(Op::Advance),
    ]
}

/// The rules, written as plainly as possible.
#[derive(Debug)]
enum Model {
    Closed { window: VecDeque<bool>, calls: u32 },
    Open { until: u64 },
    HalfOpen { issued: u32, good: u32, bad: u32 },
}

const WINDOW: usize = 4;
const MINIMUM: u32 = 2;
const OPEN_FOR: u64 = 10;
const TRIALS: u32 = 2;

impl Model {
    fn closed() -> Self {
        Model::Closed {
            window: VecDeque::new(),
            calls: 0,
        }
    }

    fn state(&self) -> State {
        match self {
            Model::Closed { .. } => State::Closed,
            Model::Open { .. } => State::Open,
            Model::HalfOpen { .. } => State::HalfOpen,
        }
    }

    /// Whether a call is let through at `now`, and as a trial.
    fn acquire(&mut self, now: u64) -> Option<bool> {
        match self {
            Model::Closed { .. } => Some(false),
            Model::Open { until } if now < *until => None,
            Model::Open { .. } => {
                *self = Model::HalfOpen {
                    issued: 1,
                    good: 0,
                    bad: 0,
                };
                Some(true)
            }
            Model::HalfOpen { issued, .. } if *issued < TRIALS => {
                *issued += 1;
                Some(true)
            }
            Model::HalfOpen { .. } => None,
        }
    }

    fn record(&mut self, now: u64, failed: bool) {
        match self {
            Model::Closed { window, calls } => {
                window.push_back(failed);
                if window.len() > WINDOW {
                    window.pop_front();
                }
                *calls += 1;
                if failed || *calls == MINIMUM {
                    let failures = window.iter().filter(|f| **f).count();
                    if window.len() as u32 >= MINIMUM && failures * 2 >= window.len() {
                        *self = Model::Open {
                            until: now + OPEN_FOR,
                        };
                    }
                }
            }
            Model::HalfOpen { good, bad, .. } => {
                if failed {
                    *bad += 1;
                } else {
                    *good += 1;
                }
                if *good + *bad == TRIALS {
                    *self = if *bad * 2 >= TRIALS {
                        Model::Open {
                            until: now + OPEN_FOR,
                        }
                    } else {
                        Model::closed()
                    };
                }
            }
            Model::Open { .. } => unreachable!("no call is let through while open"),
        }
    }

    fn abandon(&mut self, trial: bool) {
        if let (Model::HalfOpen { issued, .. }, true) = (self, trial) {
            *issued -= 1;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn the_breaker_follows_the_sequential_model(ops in proptest::collection::vec(op(), 1..120)) {
        let clock = ManualClock::new();
        let breaker = Breaker::builder("model")
            .config(
                BreakerConfig::default()
                    .with_window(Window::Count(WINDOW as u32))
                    .with_minimum_calls(MINIMUM)
                    .with_open_for(Duration::from_secs(OPEN_FOR))
                    .with_open_growth(1.0)
                    .with_jitter(0.0)
                    .with_half_open_calls(TRIALS)
                    .with_half_open_max_wait(Duration::from_secs(1_000_000)),
            )
            .clock(Arc::new(clock.clone()))
            .build()
            .unwrap();
        let mut model = Model::closed();
        let mut now = 0;
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Advance(secs) => {
                    clock.advance(Duration::from_secs(secs));
                    now += secs;
                }
                Op::Succeed | Op::Fail | Op::Abandon => {
                    let expected = model.acquire(now);
                    let permit = breaker.try_acquire();
                    prop_assert_eq!(permit.is_ok(), expected.is_some(), "op {} {:?}: admission", i, op);
                    if let (Ok(permit), Some(trial)) = (permit, expected) {
                        prop_assert_eq!(permit.is_trial(), trial);
                        match op {
                            Op::Abandon => {
                                drop(permit);
                                model.abandon(trial);
                            }
                            _ => {
                                let failed = matches!(op, Op::Fail);
                                permit.record(if failed { CallOutcome::Failure } else { CallOutcome::Success });
                                model.record(now, failed);
                            }
                        }
                    }
                }
            }
            prop_assert_eq!(breaker.state(), model.state(), "after op {} {:?}: {:?}", i, op, model);
        }
    }
}

#[test]
fn half_open_admits_exactly_its_trials_under_concurrency() {
    for round in 0..50 {
        let clock = ManualClock::new();
        let breaker = Breaker::builder("race")
            .config(
                BreakerConfig::default()
                    .with_minimum_calls(1)
                    .with_window(Window::Count(1))
                    .with_half_open_calls(3),
            )
            .clock(Arc::new(clock.clone()))
            .build()
            .unwrap();
        breaker.try_acquire().unwrap().record(CallOutcome::Failure);
        assert_eq!(breaker.state(), State::Open);
        clock.advance(Duration::from_secs(3600));
        let threads = 8;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let breaker = breaker.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    (0..50)
                        .filter_map(|_| breaker.try_acquire_owned().ok())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let permits: Vec<_> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        assert_eq!(permits.len(), 3, "round {round}: exactly the trials");
        assert!(permits.iter().all(|p| p.is_trial()));
        // Ending them from several threads at once decides exactly once.
        let handles: Vec<_> = permits
            .into_iter()
            .map(|p| std::thread::spawn(move || p.record(CallOutcome::Success)))
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(breaker.state(), State::Closed, "round {round}");
    }
}

#[test]
fn closed_outcomes_from_many_threads_all_count() {
    let breaker = Breaker::builder("count")
        .config(
            BreakerConfig::default()
                .with_window(Window::Count(10_000))
                .with_minimum_calls(10_000),
        )
        .clock(Arc::new(ManualClock::new()))
        .build()
        .unwrap();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let breaker = breaker.clone();
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    breaker.try_acquire().unwrap().record(CallOutcome::Success);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(breaker.snapshot().calls, 4000);
}
