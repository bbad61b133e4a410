"""An OpenAI- and TGI-compatible HTTP gateway in front of lora_llm on Triton.

    pip install 'multilora-client[gateway]'
    python -m multilora_client.gateway --triton-grpc localhost:8001 --port 9000

OpenAI: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (`model` = an adapter id or
the base model's name). TGI: POST /generate, /generate_stream and / (`parameters.adapter_id`).
KServe v2 HTTP under /v2, passed on to Triton's HTTP port (`--triton-http`) after the gateway's
body checks. `multilora_client.gateway.app.create_app` builds the ASGI app; this package imports nothing heavy so
that the command can say which extra is missing.
"""
