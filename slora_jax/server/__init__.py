"""OpenAI-compatible HTTP server over the engine (``slora-jax serve``; needs the ``server`` extra).

    from slora_jax.server import create_app
    app = create_app(engine, served_model_name="llama", adapter_root="/srv/adapters")
"""

from slora_jax.server.app import create_app, run_server

__all__ = ["create_app", "run_server"]
