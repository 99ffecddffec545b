//! anneal's runtime: the candle-based trainer, evaluator and OpenAI-compatible server that
//! TrainingJob, EvalGate and ModelServer pods run.
