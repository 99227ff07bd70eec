//! A wait polled only after it woke its task, for the waits a connection's task keeps
//! beside its connection and that almost never finish.
//!
//! Why: a connection hyper serves is polled together with two such waits, the
//! listener's stop and `limits.http2_idle_timeout` (`connection::hand_over`), and
//! `select!` polls every branch at every wake-up of the task: for an HTTP/2
//! connection several per request, ~700 of its instructions (callgrind;
//! docs/performance.md). Wrapped in [`Woken`], a wait is polled with a waker of its
//! own and then again only once that waker has been used; every other wake-up costs a
//! flag check.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

/// `inner`, polled only on its first poll and after it woke the task.
pub(crate) struct Woken<F> {
    inner: F,
    flag: Arc<Flag>,
    /// The waker `inner` is polled with (it sets the flag, then wakes `task`).
    own: Waker,
    /// The task's waker as last handed to `flag`, to hand it over again only when it
    /// changes (a task's waker rarely does).
    task: Option<Waker>,
}

struct Flag {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

impl<F: Future + Unpin> Woken<F> {
    pub(crate) fn new(inner: F) -> Woken<F> {
        let flag = Arc::new(Flag {
            // The first poll polls `inner`, which registers `own` where it waits.
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        Woken {
            inner,
            own: Waker::from(flag.clone()),
            flag,
            task: None,
        }
    }
}

impl<F: Future + Unpin> Future for Woken<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        // The task's waker goes to the flag before the flag is read, so a wake-up
        // between the two is not lost.
        if !this.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            let task = cx.waker().clone();
            *this
                .flag
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(task.clone());
            this.task = Some(task);
        }
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll(&mut Context::from_waker(&this.own))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready once `ready` is set and it has been woken.
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.ready.load(Ordering::Relaxed) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_wait_is_polled_again_only_after_it_woke_the_task() {
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let waker = Arc::new(Mutex::new(None::<Waker>));
        let mut woken = Woken::new(Probe {
            polls: polls.clone(),
            ready: ready.clone(),
            waker: waker.clone(),
        });
        let noop = Waker::noop();
        let mut cx = Context::from_waker(noop);
        for _ in 0..5 {
            assert!(Pin::new(&mut woken).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1, "polled once, never woken");

        // What it waits on happens: it wakes its waker, and the task with it.
        let task_woken = Arc::new(AtomicUsize::new(0));
        struct Count(Arc<AtomicUsize>);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let task = Waker::from(Arc::new(Count(task_woken.clone())));
        let mut cx = Context::from_waker(&task);
        assert!(Pin::new(&mut woken).poll(&mut cx).is_pending());
        ready.store(true, Ordering::Relaxed);
        waker.lock().unwrap().take().unwrap().wake();
        assert_eq!(task_woken.load(Ordering::Relaxed), 1, "the task was woken");
        assert!(Pin::new(&mut woken).poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }
}
