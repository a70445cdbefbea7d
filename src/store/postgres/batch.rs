//! Work that many callbacks hand in and a few workers do together: the group commit of
//! events (commit.rs) and the counter operations of decisions and outcomes
//! (`policy::shared`).
//!
//! A caller queues its item and waits for its output. Each worker takes everything
//! queued (up to a batch's size), does it in one go, on a connection of its own, and
//! answers each item. While one worker waits for the database the others take the next
//! batches, so a batch is as large as the load makes it: one item when idle, dozens
//! under load, and the database sees one round trip (and one commit) per batch instead
//! of one per item. A queue may also [`Linger`]: when load is there but batches stay
//! small (several replicas sharing it), wait a moment to fill them.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::sync::{mpsc, oneshot};

use super::pipeline;

/// Does batches of items; one per worker, each with its own connection.
pub(crate) trait BatchWorker: Send + 'static {
    type Item: Send + 'static;
    type Output: Send + 'static;

    /// Does `batch`; returns one output per item, in order. A batch that fails fails
    /// every item in it.
    fn run(&mut self, batch: Vec<Self::Item>) -> impl Future<Output = Vec<Self::Output>> + Send;
}

/// A whole batch's outcome as one output per item: each item's own, or the batch's
/// error for every one of its `items`.
pub(crate) fn per_item<T, E: Clone>(outcome: Result<Vec<T>, E>, items: usize) -> Vec<Result<T, E>> {
    match outcome {
        Ok(outputs) => outputs.into_iter().map(Ok).collect(),
        Err(err) => (0..items).map(|_| Err(err.clone())).collect(),
    }
}

/// How long a worker may wait for more items before it does a small batch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Linger {
    /// A batch with fewer items than this waits (once), if the last one showed load.
    pub(crate) below: usize,
    pub(crate) wait: Duration,
}

impl Linger {
    /// Whether a batch of `len` items, after one of `last_len`, waits for more. A batch
    /// after a lone item never waits: an idle service answers at once.
    pub(crate) fn waits(self, len: usize, last_len: usize) -> bool {
        len < self.below && last_len >= 2
    }
}

type Queued<I, O> = (I, oneshot::Sender<O>);
/// The queue's receiving end, shared by the workers (one takes a batch at a time).
type Receiver<I, O> = Arc<tokio::sync::Mutex<mpsc::Receiver<Queued<I, O>>>>;

/// Where callers hand in their items.
pub(crate) struct BatchQueue<I, O> {
    queue: mpsc::Sender<Queued<I, O>>,
}

impl<I: Send + 'static, O: Send + 'static> BatchQueue<I, O> {
    /// Starts `workers` on the database runtime. `capacity` items may wait; beyond that
    /// callers wait to join the queue. The workers stop once the queue is dropped and
    /// empty.
    pub(crate) fn start<W>(
        workers: Vec<W>,
        max_batch: usize,
        capacity: usize,
        linger: Option<Linger>,
    ) -> Self
    where
        W: BatchWorker<Item = I, Output = O>,
    {
        let (queue, receiver) = mpsc::channel::<Queued<I, O>>(capacity);
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        for worker in workers {
            pipeline::runtime().spawn(work(worker, Arc::clone(&receiver), max_batch, linger));
        }
        Self { queue }
    }

    /// Does `item` in the next batch; `None` once the workers have stopped. A thread
    /// that may block waits for it with [`pipeline::block_on`].
    pub(crate) async fn submit(&self, item: I) -> Option<O> {
        let (answer, answered) = oneshot::channel();
        self.queue.send((item, answer)).await.ok()?;
        answered.await.ok()
    }
}

/// The queue a worker's callers hand their items to.
pub(crate) type QueueOf<W> = BatchQueue<<W as BatchWorker>::Item, <W as BatchWorker>::Output>;

/// Two queues served by one loop that sends both kinds of batch at once: `a`'s and
/// `b`'s statements go out together on the one connection both workers share, so each
/// round trip carries, say, the claims of the callbacks that just arrived and the
/// counters of those claimed a moment ago. A batch of either kind still fails only its
/// own items. The loop serves the other queue after one of them is dropped, and stops
/// once both are dropped and empty.
pub(crate) fn start_paired<A: BatchWorker, B: BatchWorker>(
    mut a: A,
    mut b: B,
    max_batch: usize,
    capacity: usize,
) -> (QueueOf<A>, QueueOf<B>) {
    let (queue_a, mut waiting_a) = mpsc::channel::<Queued<A::Item, A::Output>>(capacity);
    let (queue_b, mut waiting_b) = mpsc::channel::<Queued<B::Item, B::Output>>(capacity);
    pipeline::runtime().spawn(async move {
        let (mut open_a, mut open_b) = (true, true);
        while open_a || open_b {
            let (mut batch_a, mut batch_b) = (Vec::new(), Vec::new());
            tokio::select! {
                first = waiting_a.recv(), if open_a => match first {
                    Some(first) => batch_a.push(first),
                    None => open_a = false,
                },
                first = waiting_b.recv(), if open_b => match first {
                    Some(first) => batch_b.push(first),
                    None => open_b = false,
                },
            }
            take_waiting(&mut waiting_a, &mut batch_a, max_batch);
            take_waiting(&mut waiting_b, &mut batch_b, max_batch);
            futures_util::future::join(run(&mut a, batch_a), run(&mut b, batch_b)).await;
        }
    });
    (BatchQueue { queue: queue_a }, BatchQueue { queue: queue_b })
}

/// Does `batch` (nothing when it is empty) and answers each of its items.
async fn run<W: BatchWorker>(worker: &mut W, batch: Vec<Queued<W::Item, W::Output>>) {
    if batch.is_empty() {
        return;
    }
    let (items, answers): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    for (answer, output) in answers.into_iter().zip(worker.run(items).await) {
        // The caller may have given up waiting: nothing to answer then.
        drop(answer.send(output));
    }
}

async fn work<W: BatchWorker>(
    mut worker: W,
    queue: Receiver<W::Item, W::Output>,
    max_batch: usize,
    linger: Option<Linger>,
) {
    let mut last_len = 0;
    loop {
        let mut batch = Vec::new();
        {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            batch.push(first);
            take_waiting(&mut queue, &mut batch, max_batch);
            if let Some(linger) = linger.filter(|l| l.waits(batch.len(), last_len)) {
                tokio::time::sleep(linger.wait).await;
                take_waiting(&mut queue, &mut batch, max_batch);
            }
        }
        last_len = batch.len();
        run(&mut worker, batch).await;
    }
}

/// Adds what is queued now to `batch`, up to `max_batch` items.
fn take_waiting<I, O>(
    queue: &mut mpsc::Receiver<Queued<I, O>>,
    batch: &mut Vec<Queued<I, O>>,
    max_batch: usize,
) {
    while batch.len() < max_batch {
        match queue.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINGER: Linger = Linger {
        below: 8,
        wait: Duration::from_millis(1),
    };

    #[test]
    fn only_a_small_batch_under_load_waits() {
        // Idle: the last batch was a lone item, so nothing waits.
        assert!(!LINGER.waits(1, 0));
        assert!(!LINGER.waits(1, 1));
        // Load, but small batches (several replicas share it): wait to fill them.
        assert!(LINGER.waits(1, 2));
        assert!(LINGER.waits(7, 5));
        // Large enough already.
        assert!(!LINGER.waits(8, 5));
        assert!(!LINGER.waits(30, 40));
    }

    /// A worker that records each batch's size and takes two milliseconds over it.
    struct Sizes(Arc<std::sync::Mutex<Vec<usize>>>);

    impl BatchWorker for Sizes {
        type Item = u32;
        type Output = u32;

        async fn run(&mut self, batch: Vec<u32>) -> Vec<u32> {
            self.0.lock().unwrap().push(batch.len());
            tokio::time::sleep(Duration::from_millis(2)).await;
            batch
        }
    }

    /// Batch sizes when 80 items come in pairs, a pair a millisecond.
    fn sizes_with(linger: Option<Linger>) -> Vec<usize> {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let queue = Arc::new(BatchQueue::start(
            vec![Sizes(Arc::clone(&sizes))],
            64,
            1024,
            linger,
        ));
        let answers = pipeline::runtime().block_on(async {
            let mut waiting = Vec::new();
            for i in 0..80u32 {
                let queue = Arc::clone(&queue);
                waiting.push(tokio::spawn(async move { queue.submit(i).await }));
                if i % 2 == 1 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            let mut all = Vec::new();
            for handle in waiting {
                all.push(handle.await.unwrap());
            }
            all
        });
        assert_eq!(
            answers,
            (0..80).map(Some).collect::<Vec<_>>(),
            "every item answered"
        );
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 80);
        sizes
    }

    /// A worker whose batches fail when they hold an odd item; `in_flight` counts the
    /// batches of both workers running at once, `most` the highest count seen.
    struct Failing {
        in_flight: Arc<std::sync::atomic::AtomicUsize>,
        most: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl BatchWorker for Failing {
        type Item = u32;
        type Output = Result<u32, String>;

        async fn run(&mut self, batch: Vec<u32>) -> Vec<Result<u32, String>> {
            use std::sync::atomic::Ordering::SeqCst;
            let now = self.in_flight.fetch_add(1, SeqCst) + 1;
            self.most.fetch_max(now, SeqCst);
            tokio::time::sleep(Duration::from_millis(3)).await;
            self.in_flight.fetch_sub(1, SeqCst);
            let failed = batch.iter().any(|i| i % 2 == 1).then(|| "odd".to_owned());
            per_item(failed.map_or(Ok(batch.clone()), Err), batch.len())
        }
    }

    #[test]
    fn paired_queues_send_both_kinds_together_and_a_failed_batch_fails_only_its_own_items() {
        let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let worker = || Failing {
            in_flight: Arc::clone(&in_flight),
            most: Arc::clone(&most),
        };
        let (a, b) = start_paired(worker(), worker(), 64, 1024);
        let (a, b) = (Arc::new(a), Arc::new(b));
        let (from_a, from_b) = pipeline::runtime().block_on(async {
            let mut waiting = Vec::new();
            for i in 0..40u32 {
                let (a, b) = (Arc::clone(&a), Arc::clone(&b));
                // Even items on `a`; on `b`, 1 (which fails its batch) among evens.
                let on_b = if i == 5 { 1 } else { 2 * i };
                waiting.push(tokio::spawn(async move {
                    tokio::join!(a.submit(2 * i), b.submit(on_b))
                }));
                if i % 8 == 7 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            let mut all = (Vec::new(), Vec::new());
            for handle in waiting {
                let (x, y) = handle.await.unwrap();
                all.0.push(x.unwrap());
                all.1.push(y.unwrap());
            }
            all
        });
        assert_eq!(from_a, (0..40).map(|i| Ok(2 * i)).collect::<Vec<_>>());
        let failed: Vec<usize> = (0..40).filter(|&i| from_b[i].is_err()).collect();
        assert!(failed.contains(&5), "{from_b:?}");
        assert!(
            failed.len() < 40,
            "only the failed batch's items fail: {failed:?}"
        );
        for (i, answer) in from_b.iter().enumerate() {
            if let Ok(v) = answer {
                assert_eq!(*v, 2 * i as u32);
            }
        }
        // Batches of both kinds went out together, not one after the other.
        assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn a_lingering_queue_answers_every_item_in_fewer_larger_batches() {
        let plain = sizes_with(None);
        let lingering = sizes_with(Some(Linger {
            below: 8,
            wait: Duration::from_millis(20),
        }));
        assert!(
            lingering[0] <= 2,
            "the first items find the queue idle: {lingering:?}"
        );
        assert!(
            plain.len() >= 2 * lingering.len(),
            "{plain:?} against {lingering:?}"
        );
    }
}
