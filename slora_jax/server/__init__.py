"""OpenAI-compatible HTTP server over the engine (``slora-jax serve``; needs the ``server`` extra).

    from slora_jax.server import create_app
    app = create_app(engine, served_model_name="llama", adapter_root="/srv/adapters")
"""

__all__ = ["create_app", "run_server"]


def __getattr__(name):
    # Imported on first use, so that the CLI can read slora_jax.server.flags without the server extra.
    if name in __all__:
        from slora_jax.server import app
        return getattr(app, name)
    raise AttributeError(f"module 'slora_jax.server' has no attribute {name!r}")
