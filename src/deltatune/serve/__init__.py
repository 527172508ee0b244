"""`deltatune serve`: one base model, many task adapters, over HTTP.

- `registry`: which run directories may be served (allowed root, safetensors only, same base model);
- `engine`: the models in memory and the answers (classify, complete), equal to `api.predict`/`generate`;
- `decode`: the step-by-step decoding loop (mixed adapters, per-row sampling, stop strings, streaming);
- `batching`: a bounded queue and the dynamic batcher in front of the engine;
- `metrics`: Prometheus counters and histograms;
- `app`: the FastAPI routes (OpenAI-compatible subset + /v1/classify); `command`: start uvicorn.
"""
