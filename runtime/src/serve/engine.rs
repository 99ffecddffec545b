//! The engine: one thread that owns the model, the caches and the scheduler, and loops —
//! admit waiting requests (prefill), run one batched decode step for every running sequence,
//! stream the new text out, drop finished and cancelled sequences.
//!
//! A request is cancelled when its event receiver is gone (the HTTP client disconnected).
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
use crate::model::{KvCache, Transformer};
use crate::tokenizer::Tokenizer;
use candle_core::Tensor;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Where events go; dropping the receiver cancels the request.
    pub events: UnboundedSender<Event>,
    /// When the request arrived (for time to first token).
    pub arrived: Instant,
}

/// The request could not be queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    /// The waiting queue is full.
    #[error("the request queue is full")]
    QueueFull,
    /// The engine has stopped.
    #[error("the engine has stopped")]
    Stopped,
}

/// The HTTP side's handle on the engine.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<GenRequest>,
    queued: Arc<AtomicUsize>,
    max_queue: usize,
    /// Context length: prompt plus generation must fit.
    pub max_seq_len: usize,
}

impl EngineHandle {
    /// Queues a request, or refuses at once when `max_queue` requests already wait.
    pub fn submit(&self, req: GenRequest) -> Result<(), SubmitError> {
        let prev = self.queued.fetch_add(1, Ordering::SeqCst);
        if prev >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull);
        }
        self.tx.send(req).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Stopped
        })
    }
}

/// Engine limits.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Most requests waiting for a slot.
    pub max_queue: usize,
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
pub fn start(model: EngineModel, config: EngineConfig, metrics: Arc<Metrics>) -> EngineHandle {
    let (tx, rx) = mpsc::channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let max_seq_len = model.transformer.config.max_seq_len;
    let handle = EngineHandle {
        tx,
        queued: queued.clone(),
        max_queue: config.max_queue,
        max_seq_len,
    };
    std::thread::Builder::new()
        .name("anneal-engine".into())
        .spawn(move || Engine::new(model, config, metrics, queued).run(rx))
        .map(drop)
        .unwrap_or_else(|e| tracing::error!("cannot start the engine thread: {e}"));
    handle
}

struct Sequence {
    req: GenRequest,
    cache: SeqCache,
    sampler: Sampler,
    generated: Vec<u32>,
    text: TextStream,
    last: u32,
}

struct Engine {
    model: EngineModel,
    padded: DecodeWeights,
    /// The CPU-kernel layout of the model, when it has one (see the module documentation).
    cpu: Option<CpuModel>,
    scratch: Scratch,
    logits: Vec<f32>,
    pool: KvPool,
    scheduler: Scheduler<GenRequest>,
    running: Vec<Sequence>,
    metrics: Arc<Metrics>,
    queued: Arc<AtomicUsize>,
}

impl Engine {
    fn new(
        model: EngineModel,
        config: EngineConfig,
        metrics: Arc<Metrics>,
        queued: Arc<AtomicUsize>,
    ) -> Self {
        let cpu = if std::env::var("ANNEAL_CPU_KERNELS").as_deref() == Ok("0") {
            None
        } else {
            CpuModel::new(&model.transformer)
        };
        tracing::info!(
            cpu_kernels = cpu.is_some(),
            isa = ?crate::kernels::qmatmul::detect(),
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
            queued,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<GenRequest>) {
        loop {
            if self.running.is_empty() && self.scheduler.is_empty() {
                match rx.recv() {
                    Ok(r) => self.scheduler.push(r.priority, r),
                    Err(_) => return,
                }
            }
            while let Ok(r) = rx.try_recv() {
                self.scheduler.push(r.priority, r);
            }
            let mut new = Vec::new();
            while let Some(req) = self.scheduler.admit(self.running.len() + new.len()) {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                if self.cpu.is_some() {
                    new.push(req);
                } else {
                    self.admit(req);
                }
            }
            self.metrics.queue_depth.set(self.scheduler.len() as i64);
            self.drop_cancelled();
            if self.cpu.is_some() {
                if !self.running.is_empty() || !new.is_empty() {
                    self.cpu_step(new);
                }
            } else if !self.running.is_empty() {
                self.decode_step();
            }
            self.metrics.kv_cache_bytes.set(self.pool.bytes() as i64);
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
    fn admit(&mut self, req: GenRequest) {
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
        self.start_sequence(req, cache, &logits);
    }

    /// Samples a prefilled sequence's first token and starts it.
    fn start_sequence(&mut self, req: GenRequest, cache: SeqCache, logits: &[f32]) {
        let mut sampler = Sampler::new(req.sampling.clone());
        let first = sampler.sample(logits);
        self.metrics
            .ttft
            .observe(req.arrived.elapsed().as_secs_f64());
        let text = TextStream::new(self.model.tokenizer.clone(), req.stop.clone());
        let mut seq = Sequence {
            req,
            cache,
            sampler,
            generated: Vec::new(),
            text,
            last: first,
        };
        if self.accept(&mut seq, first) {
            self.running.push(seq);
        } else {
            self.pool.give_back(seq.cache);
        }
    }

    /// Records a sampled token; false when the sequence is finished (its Done already sent).
    fn accept(&mut self, seq: &mut Sequence, token: u32) -> bool {
        let done = |seq: &Sequence, reason| Event::Done {
            reason,
            prompt_tokens: seq.req.prompt.len(),
            completion_tokens: seq.generated.len(),
        };
        if !seq.req.ignore_eos && self.model.stop_ids.contains(&token) {
            if let Some(rest) = seq.text.flush() {
                let _ = seq.req.events.send(Event::Delta(rest));
            }
            let _ = seq.req.events.send(done(seq, FinishReason::Stop));
            return false;
        }
        seq.generated.push(token);
        seq.last = token;
        self.metrics.generated_tokens.inc();
        let (delta, stopped) = seq.text.push(&seq.generated);
        if !delta.is_empty() {
            let _ = seq.req.events.send(Event::Delta(delta));
        }
        if stopped {
            let _ = seq.req.events.send(done(seq, FinishReason::Stop));
            return false;
        }
        let next_pos = seq.req.prompt.len() + seq.generated.len();
        if seq.generated.len() >= seq.req.max_tokens || next_pos >= self.pool.capacity() {
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
            .map(|s| s.req.prompt.len() + s.generated.len() - 1)
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
            let token = seq.sampler.sample(&row);
            if self.accept(&mut seq, token) {
                self.running.push(seq);
            } else {
                self.pool.give_back(seq.cache);
            }
        }
    }

    /// One forward pass of the CPU kernels: the prompts of `new` (prefill) and one token of
    /// every running sequence (decode), then sampling.
    fn cpu_step(&mut self, new: Vec<GenRequest>) {
        let mut fresh = Vec::new();
        for req in new {
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
            match self.pool.take() {
                Ok(cache) => fresh.push((req, cache)),
                Err(e) => {
                    let _ = req
                        .events
                        .send(Event::Error(format!("prefill failed: {e}")));
                }
            }
        }
        let mut running = std::mem::take(&mut self.running);
        self.metrics.batch_size.set(running.len() as i64);
        let expected = running.len() + fresh.len();
        let result = {
            let mut segments = Vec::with_capacity(expected);
            for s in running.iter_mut() {
                let start = s.req.prompt.len() + s.generated.len() - 1;
                if let SeqCache::Cpu(cache) = &mut s.cache {
                    let tokens = std::slice::from_ref(&s.last);
                    segments.push(Segment {
                        tokens,
                        start,
                        cache,
                    });
                }
            }
            for (req, cache) in fresh.iter_mut() {
                if let SeqCache::Cpu(cache) = cache {
                    let tokens = req.prompt.as_slice();
                    segments.push(Segment {
                        tokens,
                        start: 0,
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
            for (req, cache) in fresh {
                let _ = req
                    .events
                    .send(Event::Error(format!("prefill failed: {e}")));
                self.pool.give_back(cache);
            }
            return;
        }
        let logits = std::mem::take(&mut self.logits);
        let vocab = logits.len() / (running.len() + fresh.len());
        let mut rows = logits.chunks_exact(vocab);
        for (mut seq, row) in running.into_iter().zip(rows.by_ref()) {
            let token = seq.sampler.sample(row);
            if self.accept(&mut seq, token) {
                self.running.push(seq);
            } else {
                self.pool.give_back(seq.cache);
            }
        }
        for ((req, cache), row) in fresh.into_iter().zip(rows) {
            self.start_sequence(req, cache, row);
        }
        self.logits = logits;
    }
}
