//! Work that many callbacks hand in and a few workers do together: the group commit of
//! events (commit.rs) and the counter operations of decisions and outcomes
//! (`policy::shared`).
//!
//! A caller queues its item and waits for its output. Each worker takes everything
//! queued (up to a batch's size), does it in one go, on a connection of its own, and
//! answers each item. While one worker waits for the database the others take the next
//! batches, so a batch is as large as the load makes it: one item when idle, dozens
//! under load, and the database sees one round trip (and one commit) per batch instead
//! of one per item.

use std::{future::Future, sync::Arc};

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
    pub(crate) fn start<W>(workers: Vec<W>, max_batch: usize, capacity: usize) -> Self
    where
        W: BatchWorker<Item = I, Output = O>,
    {
        let (queue, receiver) = mpsc::channel::<Queued<I, O>>(capacity);
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        for worker in workers {
            pipeline::runtime().spawn(work(worker, Arc::clone(&receiver), max_batch));
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

async fn work<W: BatchWorker>(
    mut worker: W,
    queue: Receiver<W::Item, W::Output>,
    max_batch: usize,
) {
    loop {
        let mut batch = Vec::new();
        {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            batch.push(first);
            while batch.len() < max_batch {
                match queue.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
        }
        let (items, answers): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let outputs = worker.run(items).await;
        for (answer, output) in answers.into_iter().zip(outputs) {
            // The caller may have given up waiting: nothing to answer then.
            drop(answer.send(output));
        }
    }
}
