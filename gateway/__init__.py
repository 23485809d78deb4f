"""OpenAI-compatible HTTP gateway in front of the inference service.

The AutoGLM tool chain (the OpenAI SDK, LangChain's ``ChatOpenAI``) speaks the
chat-completions HTTP API; this package translates that API to the service's public
gRPC contract (``autoglm.inference.v1.InferenceService``).

Why a separate process that talks gRPC rather than a second transport inside the
service:

- it never imports torch or anything of ``inference_svc``, so it starts in a fraction of
  a second, stays small, installs without torch (``pip install autoglm-serve``), and can
  be scaled out or restarted without touching the weights;
- it uses only the public contract, through the Python client library
  (``autoglm_client``: channel, TLS, status and retry-hint parsing, request ids), so it
  gets exactly what every other client gets and cannot reach into engine internals;
- an HTTP client that goes away becomes a gRPC cancellation of the upstream call, which
  the engine already handles by freeing the request's KV cache at once.

Layout: ``config`` (settings from flags and environment), ``openai_schema`` (the
HTTP request models), ``request_mapping`` (OpenAI request -> ``GenerateRequest``),
``response_building`` (gRPC responses -> OpenAI JSON and SSE chunks),
``chat_completions`` (drives one call: whole answer or SSE stream, cancel on disconnect),
``realtime`` (the /v1/realtime WebSocket: OpenAI's Realtime API, speech in, text out; its
``realtime_schema``, ``realtime_events``, ``realtime_conversation``, ``realtime_upload``
(speech streamed to GenerateLive while spoken), ``realtime_response``, and ``resample``),
``checks`` (API key and model name),
``upstream`` (the one ``grpc.aio`` channel), ``errors`` (OpenAI error shape, gRPC status
-> HTTP status), ``body_limit`` (413 before parsing), ``app`` (the FastAPI routes),
``cli``.
"""
