//! The engine: one thread that owns the model, the caches and the scheduler, and loops —
//! admit waiting requests (prefill), run one batched decode step for every running sequence,
//! stream the new text out, drop finished and cancelled sequences.
//!
//! A request is cancelled when its event receiver is gone (the HTTP client disconnected).
//!
//! A request holds a place in the engine from submission until it ends: the engine takes at
//! most `max_batch + max_queue` of them, so that requests which fit free batch slots do not
//! count against the waiting queue.
//!
//! The thread is supervised: a panic is caught, logged and reported through the handle
//! ([`EngineHandle::stopped`]), so that the probes fail and the server exits rather than
//! answer 503 forever.
//!
//! On the CPU with a quantized model the engine runs [`CpuModel`]: then the prompts admitted
//! in an iteration and the decode step of the running sequences are one forward pass, so the
//! weights are read once for all of them.

use super::cpu_model::{CpuModel, Scratch, Segment};
use super::decode_weights::DecodeWeights;
use super::kv_pool::{KvPool, SeqCache};
use super::metrics::Metrics;
use super::sampling::{Sampler, SamplingParams};
use super::scheduler::Scheduler;
use super::text_stream::TextStream;
use super::worker::Supervised;
use crate::model::{KvCache, Transformer};
use crate::tokenizer::Tokenizer;
use candle_core::Tensor;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop sequence.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

impl FinishReason {
    /// The OpenAI name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// What the engine sends back for a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// More text.
    Delta(String),
    /// The generation ended.
    Done {
        /// Why.
        reason: FinishReason,
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// Tokens generated.
        completion_tokens: usize,
    },
    /// The generation failed.
    Error(String),
}

/// A generation request, as the HTTP layer hands it over.
pub struct GenRequest {
    /// Prompt token ids (non-empty, shorter than the context).
    pub prompt: Vec<u32>,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Texts that end the generation (not included in the output).
    pub stop: Vec<String>,
    /// Higher runs first.
    pub priority: i32,
    /// Generate `max_tokens` even past end-of-sequence (benchmarks).
    pub ignore_eos: bool,
    /// Whose request this is (a hash of the caller's credentials): cached prompt prefixes are
    /// reused only for the same caller.
    pub cache_owner: u64,
    /// Where events go; dropping the receiver cancels the request.
    pub events: UnboundedSender<Event>,
    /// When the request arrived (for time to first token).
    pub arrived: Instant,
}

/// The request could not be queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    /// Every batch slot is taken and the waiting queue is full.
    #[error("the request queue is full")]
    QueueFull,
    /// The engine has stopped.
    #[error("the engine has stopped")]
    Stopped,
}

/// A request's place in the engine (a batch slot or a queue place), given back when the
/// request ends however it ends: answered, failed, cancelled, or dropped with the engine.
struct Place(Gauge);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A request with its place, as the engine receives it.
struct Submitted {
    req: GenRequest,
    place: Place,
}

/// The HTTP side's handle on the engine.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Submitted>,
    /// Requests in the engine (queued or running); the metric is the count itself.
    in_engine: Gauge,
    /// Most requests in the engine: batch slots plus queue places.
    capacity: usize,
    /// Whether the engine thread still runs.
    thread: Supervised,
    /// Context length: prompt plus generation must fit.
    pub max_seq_len: usize,
}

impl EngineHandle {
    /// Queues a request, or refuses at once when every batch slot and queue place is taken.
    pub fn submit(&self, req: GenRequest) -> Result<(), SubmitError> {
        if self.stopped().is_some() {
            return Err(SubmitError::Stopped);
        }
        let place = Place(self.in_engine.clone());
        if self.in_engine.inc() as usize >= self.capacity {
            return Err(SubmitError::QueueFull);
        }
        self.tx
            .send(Submitted { req, place })
            .map_err(|_| SubmitError::Stopped)
    }

    /// Why the engine thread ended, once it has (a panic's message): from then on no request
    /// can be answered.
    pub fn stopped(&self) -> Option<String> {
        self.thread.stopped()
    }

    /// Waits until the engine thread ends; why it ended.
    pub async fn wait_stopped(&self) -> String {
        self.thread.wait_stopped().await
    }

    /// The engine thread's supervision.
    pub fn thread(&self) -> &Supervised {
        &self.thread
    }
}

/// Engine limits.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Most requests waiting for a slot.
    pub max_queue: usize,
    /// Reuse the keys and values of a finished sequence's prompt prefix (CPU kernels).
    pub prefix_cache: bool,
}

/// What the engine needs of a loaded model.
pub struct EngineModel {
    /// The network.
    pub transformer: Transformer,
    /// Its tokenizer (for streaming text and stop sequences).
    pub tokenizer: Arc<dyn Tokenizer>,
    /// Tokens that end a generation.
    pub stop_ids: Vec<u32>,
}

/// Starts the engine thread over `model`.
pub fn start(
    model: EngineModel,
    config: EngineConfig,
    metrics: Arc<Metrics>,
) -> std::io::Result<EngineHandle> {
    let max_seq_len = model.transformer.config.max_seq_len;
    let capacity = config.max_batch.max(1) + config.max_queue;
    let in_engine = metrics.requests_in_engine.clone();
    supervise(max_seq_len, capacity, in_engine, move |rx| {
        Engine::new(model, config, metrics).run(rx)
    })
}

/// Runs `body` on the engine thread, catching a panic: it is logged and reported through the
/// handle (see [`EngineHandle::stopped`]).
fn supervise(
    max_seq_len: usize,
    capacity: usize,
    in_engine: Gauge,
    body: impl FnOnce(mpsc::Receiver<Submitted>) + Send + 'static,
) -> std::io::Result<EngineHandle> {
    let (tx, rx) = mpsc::channel();
    // Unwinding drops the engine, and with it every request's event sender: their clients get
    // an error instead of waiting for ever.
    let thread = Supervised::spawn("engine", move || body(rx))?;
    Ok(EngineHandle {
        tx,
        in_engine,
        capacity,
        thread,
        max_seq_len,
    })
}

/// An engine thread that dies at once with `msg`, for the tests of what a dead engine does.
#[cfg(test)]
pub(crate) fn panicked(msg: &'static str) -> EngineHandle {
    supervise(64, 4, Gauge::default(), move |_| std::panic::panic_any(msg)).unwrap()
}

/// An engine thread that takes requests and drops them, for tests that need a live one.
#[cfg(test)]
pub(crate) fn idle() -> EngineHandle {
    supervise(64, 4, Gauge::default(), |rx| rx.iter().for_each(drop)).unwrap()
}

struct Sequence {
    req: GenRequest,
    /// Held until the sequence is dropped.
    _place: Place,
    cache: SeqCache,
    sampler: Sampler,
    /// Tokens generated so far.
    generated: usize,
    text: TextStream,
    last: u32,
    /// Tokens whose keys and values the cache holds (the prompt, then every token fed back).
    history: Vec<u32>,
}

struct Engine {
    model: EngineModel,
    padded: DecodeWeights,
    /// The CPU-kernel layout of the model, when it has one (see the module documentation).
    cpu: Option<CpuModel>,
    scratch: Scratch,
    logits: Vec<f32>,
    pool: KvPool,
    scheduler: Scheduler<Submitted>,
    running: Vec<Sequence>,
    metrics: Arc<Metrics>,
    prefix_cache: bool,
}

impl Engine {
    fn new(model: EngineModel, config: EngineConfig, metrics: Arc<Metrics>) -> Self {
        let cpu = if std::env::var("ANNEAL_CPU_KERNELS").as_deref() == Ok("0") {
            None
        } else {
            CpuModel::new(&model.transformer)
        };
        let weight_bytes = cpu.as_ref().map_or(0, CpuModel::weight_bytes_per_step);
        metrics.weight_bytes_per_step.set(weight_bytes as i64);
        tracing::info!(
            cpu_kernels = cpu.is_some(),
            isa = ?crate::kernels::gemm::qmatmul::detect(),
            weight_mb_per_step = weight_bytes as f64 / 1e6,
            "engine path"
        );
        // Caches live where the model does (the GPU when serving on one).
        let pool = KvPool::new(
            &model.transformer.config,
            model.transformer.config.max_seq_len,
            model.transformer.embedding.device(),
            cpu.is_some(),
        );
        let padded = if cpu.is_some() {
            DecodeWeights::none()
        } else {
            DecodeWeights::new(&model.transformer).unwrap_or_else(|e| {
                tracing::warn!("decode weights stay unpadded: {e}");
                DecodeWeights::none()
            })
        };
        Self {
            model,
            padded,
            cpu,
            scratch: Scratch::default(),
            logits: Vec::new(),
            pool,
            scheduler: Scheduler::new(config.max_batch),
            running: Vec::new(),
            metrics,
            prefix_cache: config.prefix_cache,
        }
    }

    /// A finished sequence's cache goes back to the pool with what it holds.
    fn finish(&mut self, seq: Sequence) {
        self.pool.keep(seq.cache, seq.history, seq.req.cache_owner);
    }

    fn run(mut self, rx: mpsc::Receiver<Submitted>) {
        loop {
            if self.running.is_empty() && self.scheduler.is_empty() {
                match rx.recv() {
                    Ok(r) => self.scheduler.push(r.req.priority, r),
                    Err(_) => return,
                }
            }
            while let Ok(r) = rx.try_recv() {
                self.scheduler.push(r.req.priority, r);
            }
            // Waiting requests whose client went away give their places back now.
            self.scheduler.retain(|r| !r.req.events.is_closed());
            self.drop_cancelled();
            let mut new = Vec::new();
            while let Some(r) = self.scheduler.admit(self.running.len() + new.len()) {
                if self.cpu.is_some() {
                    new.push(r);
                } else {
                    self.admit(r);
                }
            }
            self.metrics.queue_depth.set(self.scheduler.len() as i64);
            if self.cpu.is_some() {
                self.cpu_step(new);
            } else if !self.running.is_empty() {
                self.decode_step();
            }
            self.metrics.kv_cache_bytes.set(self.pool.bytes() as i64);
            self.metrics.kv_caches_in_use.set(self.pool.in_use() as i64);
            self.metrics.kv_caches_free.set(self.pool.free() as i64);
        }
    }

    /// Frees the sequences whose client went away.
    fn drop_cancelled(&mut self) {
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|s| s.req.events.is_closed());
        self.running = kept;
        for s in gone {
            self.pool.give_back(s.cache);
        }
    }

    /// Prefills a new sequence and emits its first token.
    fn admit(&mut self, Submitted { req, place }: Submitted) {
        if req.events.is_closed() {
            return;
        }
        let result = (|| -> candle_core::Result<(SeqCache, Vec<f32>)> {
            let mut cache = self.pool.take()?;
            let device = self.model.transformer.embedding.device();
            let tokens = Tensor::new(req.prompt.as_slice(), device)?.unsqueeze(0)?;
            let logits = self
                .model
                .transformer
                .forward_last(&tokens, 0, Some(cache.candle()?));
            match logits.and_then(|l| l.squeeze(0)?.to_vec1::<f32>()) {
                Ok(l) => Ok((cache, l)),
                Err(e) => {
                    self.pool.give_back(cache);
                    Err(e)
                }
            }
        })();
        let (cache, logits) = match result {
            Ok(r) => r,
            Err(e) => {
                crate::error::exit_on_device_fault(&e);
                let _ = req
                    .events
                    .send(Event::Error(format!("prefill failed: {e}")));
                return;
            }
        };
        self.start_sequence(Submitted { req, place }, cache, &logits);
    }

    /// Samples a prefilled sequence's first token and starts it.
    fn start_sequence(&mut self, submitted: Submitted, cache: SeqCache, logits: &[f32]) {
        let Submitted { req, place } = submitted;
        let mut sampler = Sampler::new(req.sampling.clone());
        let first = sampler.sample(logits);
        self.metrics
            .ttft
            .observe(req.arrived.elapsed().as_secs_f64());
        let text = TextStream::new(self.model.tokenizer.clone(), req.stop.clone());
        let history = req.prompt.clone();
        let mut seq = Sequence {
            req,
            _place: place,
            cache,
            sampler,
            generated: 0,
            text,
            last: first,
            history,
        };
        if self.accept(&mut seq, first) {
            self.running.push(seq);
        } else {
            self.finish(seq);
        }
    }

    /// Records a sampled token; false when the sequence is finished (its Done already sent).
    fn accept(&mut self, seq: &mut Sequence, token: u32) -> bool {
        let done = |seq: &Sequence, reason| Event::Done {
            reason,
            prompt_tokens: seq.req.prompt.len(),
            completion_tokens: seq.generated,
        };
        if !seq.req.ignore_eos && self.model.stop_ids.contains(&token) {
            if let Some(rest) = seq.text.flush() {
                let _ = seq.req.events.send(Event::Delta(rest));
            }
            let _ = seq.req.events.send(done(seq, FinishReason::Stop));
            return false;
        }
        seq.generated += 1;
        seq.last = token;
        self.metrics.generated_tokens.inc();
        let (delta, stopped) = seq.text.push(token);
        if !delta.is_empty() {
            let _ = seq.req.events.send(Event::Delta(delta));
        }
        if stopped {
            let _ = seq.req.events.send(done(seq, FinishReason::Stop));
            return false;
        }
        let next_pos = seq.req.prompt.len() + seq.generated;
        if seq.generated >= seq.req.max_tokens || next_pos >= self.pool.capacity() {
            if let Some(rest) = seq.text.flush() {
                let _ = seq.req.events.send(Event::Delta(rest));
            }
            let _ = seq.req.events.send(done(seq, FinishReason::Length));
            return false;
        }
        true
    }

    fn decode_step(&mut self) {
        let mut running = std::mem::take(&mut self.running);
        self.metrics.batch_size.set(running.len() as i64);
        let tokens: Vec<u32> = running.iter().map(|s| s.last).collect();
        let positions: Vec<usize> = running
            .iter()
            .map(|s| s.req.prompt.len() + s.generated - 1)
            .collect();
        let logits = {
            let caches = running
                .iter_mut()
                .map(|s| s.cache.candle())
                .collect::<candle_core::Result<Vec<&mut KvCache>>>();
            caches.and_then(|mut caches| {
                self.model
                    .transformer
                    .forward_decode_batch(&tokens, &positions, &mut caches, &self.padded)
                    .and_then(|l| l.to_vec2::<f32>())
            })
        };
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                crate::error::exit_on_device_fault(&e);
                for s in running {
                    let _ = s
                        .req
                        .events
                        .send(Event::Error(format!("decode failed: {e}")));
                    self.pool.give_back(s.cache);
                }
                return;
            }
        };
        for (mut seq, row) in running.into_iter().zip(logits) {
            seq.history.push(seq.last);
            let token = seq.sampler.sample(&row);
            if self.accept(&mut seq, token) {
                self.running.push(seq);
            } else {
                self.finish(seq);
            }
        }
    }

    /// One forward pass of the CPU kernels: the prompts of `new` (prefill) and one token of
    /// every running sequence (decode), then sampling.
    fn cpu_step(&mut self, new: Vec<Submitted>) {
        let mut fresh = Vec::new();
        for submitted in new {
            let req = &submitted.req;
            if req.events.is_closed() {
                continue;
            }
            // A prompt the model refuses fails alone, not the whole batch.
            let fits = self
                .cpu
                .as_ref()
                .map(|cpu| cpu.check(&req.prompt, 0, self.pool.capacity()));
            if let Some(Err(e)) = fits {
                let _ = req
                    .events
                    .send(Event::Error(format!("prefill failed: {e}")));
                continue;
            }
            let taken = if self.prefix_cache {
                self.pool.take_for(&req.prompt, req.cache_owner)
            } else {
                self.pool.take().map(|c| (c, 0))
            };
            match taken {
                Ok((cache, reused)) => {
                    self.metrics.prefix_cache_tokens.inc_by(reused as u64);
                    fresh.push((submitted, cache, reused));
                }
                Err(e) => {
                    let _ = req
                        .events
                        .send(Event::Error(format!("prefill failed: {e}")));
                }
            }
        }
        // Every admitted request may have been cancelled with nothing else running: then there
        // is nothing to compute (and no logits to share out).
        if self.running.is_empty() && fresh.is_empty() {
            return;
        }
        let mut running = std::mem::take(&mut self.running);
        self.metrics.batch_size.set(running.len() as i64);
        let expected = running.len() + fresh.len();
        let result = {
            let mut segments = Vec::with_capacity(expected);
            for s in running.iter_mut() {
                // Fed now: its keys and values go into the cache.
                s.history.push(s.last);
            }
            for s in running.iter_mut() {
                let start = s.req.prompt.len() + s.generated - 1;
                if let SeqCache::Cpu(cache) = &mut s.cache {
                    let tokens = std::slice::from_ref(&s.last);
                    segments.push(Segment {
                        tokens,
                        start,
                        cache,
                    });
                }
            }
            for (submitted, cache, reused) in fresh.iter_mut() {
                if let SeqCache::Cpu(cache) = cache {
                    // A reused prefix is in the cache already: only the rest is computed.
                    let tokens = &submitted.req.prompt[*reused..];
                    segments.push(Segment {
                        tokens,
                        start: *reused,
                        cache,
                    });
                }
            }
            match &self.cpu {
                Some(cpu) if segments.len() == expected => {
                    cpu.forward(&mut segments, &mut self.scratch, &mut self.logits)
                }
                _ => Err("a sequence without a CPU-kernel cache".to_string()),
            }
        };
        if let Err(e) = result {
            for s in running {
                let _ = s
                    .req
                    .events
                    .send(Event::Error(format!("decode failed: {e}")));
                self.pool.give_back(s.cache);
            }
            for (submitted, cache, _) in fresh {
                let _ = submitted
                    .req
                    .events
                    .send(Event::Error(format!("prefill failed: {e}")));
                self.pool.give_back(cache);
            }
            return;
        }
        let logits = std::mem::take(&mut self.logits);
        let vocab = logits.len() / expected;
        let mut rows = logits.chunks_exact(vocab);
        for (mut seq, row) in running.into_iter().zip(rows.by_ref()) {
            let token = seq.sampler.sample(row);
            if self.accept(&mut seq, token) {
                self.running.push(seq);
            } else {
                self.finish(seq);
            }
        }
        for ((submitted, cache, _), row) in fresh.into_iter().zip(rows) {
            self.start_sequence(submitted, cache, row);
        }
        self.logits = logits;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

    fn request() -> (GenRequest, UnboundedReceiver<Event>) {
        let (events, rx) = unbounded_channel();
        let req = GenRequest {
            prompt: vec![1],
            sampling: SamplingParams::default(),
            max_tokens: 1,
            stop: Vec::new(),
            priority: 0,
            ignore_eos: false,
            cache_owner: 0,
            events,
            arrived: Instant::now(),
        };
        (req, rx)
    }

    #[tokio::test]
    async fn a_panic_is_reported_and_later_requests_are_refused() {
        let h = supervise(16, 4, Gauge::default(), |_rx| panic!("boom")).unwrap();
        let why = h.wait_stopped().await;
        assert!(why.contains("boom"), "{why}");
        assert_eq!(h.stopped(), Some(why));
        assert_eq!(h.submit(request().0), Err(SubmitError::Stopped));
    }

    #[test]
    fn places_are_held_until_requests_end_even_when_the_engine_panics() {
        let places = Gauge::default();
        let (step_tx, step_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        // An engine that holds what it receives; on each step it lets one request go, and
        // on the last it panics holding the rest.
        let h = supervise(16, 3, places.clone(), move |rx| {
            let mut held: Vec<Submitted> = rx.iter().take(3).collect();
            done_tx.send(()).unwrap();
            step_rx.recv().unwrap();
            held.pop();
            done_tx.send(()).unwrap();
            step_rx.recv().unwrap();
            let _keep = (held, rx);
            panic!("holding requests");
        })
        .unwrap();
        let clients: Vec<_> = (0..3)
            .map(|_| {
                let (req, events) = request();
                h.submit(req).unwrap();
                events
            })
            .collect();
        assert_eq!(h.submit(request().0), Err(SubmitError::QueueFull));
        done_rx.recv().unwrap();
        assert_eq!(places.get(), 3, "a refused request took a place");
        step_tx.send(()).unwrap();
        done_rx.recv().unwrap();
        assert_eq!(places.get(), 2);
        let (req, fourth) = request();
        h.submit(req).unwrap();
        step_tx.send(()).unwrap();
        while h.stopped().is_none() {
            std::thread::yield_now();
        }
        // Unwinding dropped every request: each client learns its request ended, and every
        // place is free again.
        for mut events in clients.into_iter().chain([fourth]) {
            assert!(matches!(
                events.try_recv(),
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected)
            ));
        }
        assert_eq!(places.get(), 0);
    }
}
