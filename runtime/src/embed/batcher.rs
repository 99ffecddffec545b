//! The embedding worker: one thread owns the model; requests wait in a channel, and each round
//! takes every waiting request, sorts their inputs by length and runs them in batches of at most
//! `max_batch_tokens` token slots (inputs times the longest input of the batch, padding
//! included), as text-embeddings-inference's `--max-batch-tokens` bounds a batch.

use super::EmbeddingModel;
use crate::serve::metrics::Metrics;
use crate::serve::worker::Supervised;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::Arc;
use std::sync::mpsc;
use tokio::sync::oneshot;

/// Why a request was not taken.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Every queue place is taken.
    #[error("the embedding queue is full")]
    QueueFull,
    /// The worker thread has stopped.
    #[error("the embedding worker has stopped")]
    Stopped,
}

/// The sentence vectors of one request's inputs, in order, or why the batch failed.
pub type Reply = Result<Vec<Vec<f32>>, String>;

struct Job {
    inputs: Vec<Vec<u32>>,
    reply: oneshot::Sender<Reply>,
    /// Held until the job ends (its queue place).
    _place: Place,
}

struct Place(Gauge);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The HTTP side's handle on the embedding worker.
#[derive(Clone)]
pub struct EmbedHandle {
    tx: mpsc::Sender<Job>,
    in_worker: Gauge,
    max_queue: usize,
    thread: Supervised,
}

impl EmbedHandle {
    /// Queues one request's inputs (token ids, each within the model's limit); the receiver
    /// gets their vectors. Refused at once when `max_queue` requests are already waiting.
    pub fn submit(&self, inputs: Vec<Vec<u32>>) -> Result<oneshot::Receiver<Reply>, SubmitError> {
        if self.thread.stopped().is_some() {
            return Err(SubmitError::Stopped);
        }
        let place = Place(self.in_worker.clone());
        if self.in_worker.inc() as usize >= self.max_queue {
            return Err(SubmitError::QueueFull);
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                inputs,
                reply,
                _place: place,
            })
            .map_err(|_| SubmitError::Stopped)?;
        Ok(rx)
    }

    /// The worker thread's supervision.
    pub fn thread(&self) -> &Supervised {
        &self.thread
    }
}

/// Starts the worker thread over `model`.
pub fn start(
    model: Arc<EmbeddingModel>,
    max_batch_tokens: usize,
    max_queue: usize,
    metrics: Arc<Metrics>,
) -> std::io::Result<EmbedHandle> {
    let (tx, rx) = mpsc::channel::<Job>();
    let in_worker = metrics.requests_in_engine.clone();
    let thread = Supervised::spawn("embedder", move || {
        // Each round: block for one request, then take every other one already waiting.
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            jobs.extend(rx.try_iter());
            // A client that went away needs no answer.
            jobs.retain(|j| !j.reply.is_closed());
            run_round(&model, max_batch_tokens, &metrics, jobs);
        }
    })?;
    Ok(EmbedHandle {
        tx,
        in_worker,
        max_queue: max_queue.max(1),
        thread,
    })
}

fn run_round(model: &EmbeddingModel, max_batch_tokens: usize, metrics: &Metrics, jobs: Vec<Job>) {
    // Every input of the round, shortest first, so a batch pads little.
    let mut order: Vec<(usize, usize)> = jobs
        .iter()
        .enumerate()
        .flat_map(|(j, job)| (0..job.inputs.len()).map(move |i| (j, i)))
        .collect();
    order.sort_by_key(|&(j, i)| (jobs[j].inputs[i].len(), j, i));
    let mut out: Vec<Vec<Option<Vec<f32>>>> =
        jobs.iter().map(|j| vec![None; j.inputs.len()]).collect();
    let mut failed: Option<String> = None;
    for batch in batches(&order, |&(j, i)| jobs[j].inputs[i].len(), max_batch_tokens) {
        let inputs: Vec<&[u32]> = batch
            .iter()
            .map(|&(j, i)| jobs[j].inputs[i].as_slice())
            .collect();
        let width = inputs.iter().map(|i| i.len()).max().unwrap_or(0);
        metrics
            .embedding_batch_tokens
            .set((inputs.len() * width) as i64);
        match model.embed(&inputs) {
            Ok(vectors) => {
                metrics.embedded_inputs.inc_by(inputs.len() as u64);
                metrics
                    .embedded_tokens
                    .inc_by(inputs.iter().map(|i| i.len() as u64).sum());
                for (&(j, i), v) in batch.iter().zip(vectors) {
                    out[j][i] = Some(v);
                }
            }
            Err(e) => {
                failed = Some(format!("embedding a batch of {} inputs: {e}", inputs.len()));
                break;
            }
        }
    }
    for (job, vectors) in jobs.into_iter().zip(out) {
        let reply = match &failed {
            Some(why) => Err(why.clone()),
            None => Ok(vectors.into_iter().map(Option::unwrap_or_default).collect()),
        };
        let _ = job.reply.send(reply);
    }
}

/// Splits `items` (sorted by length) into consecutive batches whose token slots (count times
/// the longest) stay within `budget`; an item longer than the budget is a batch of its own.
fn batches<T>(items: &[T], len: impl Fn(&T) -> usize, budget: usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut longest = 0;
    for (k, item) in items.iter().enumerate() {
        let l = len(item).max(1);
        let count = k - start + 1;
        if count > 1 && count * longest.max(l) > budget {
            out.push(&items[start..k]);
            start = k;
            longest = 0;
        }
        longest = longest.max(l);
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_stay_within_the_token_budget() {
        let lens = [1, 2, 3, 3, 5, 8, 20];
        let got: Vec<Vec<usize>> = batches(&lens, |l| *l, 10)
            .into_iter()
            .map(<[usize]>::to_vec)
            .collect();
        // [1,2,3]: 3x3=9; adding 3 makes 4x3=12. [3,5]: 2x5=10. [8]: 2x8 > 10. [20] alone.
        assert_eq!(got, vec![vec![1, 2, 3], vec![3, 5], vec![8], vec![20]]);
        for b in batches(&lens, |l| *l, 10) {
            assert!(b.len() == 1 || b.len() * b.iter().max().unwrap() <= 10);
        }
        assert!(batches(&[] as &[usize], |l| *l, 10).is_empty());
    }
}
