"""The compiled programs of the steps an engine really ran, for tests that read their HLO."""


def dispatched_steps(engine, run) -> list[tuple]:
    """Call ``run()`` with the engine's step dispatches recorded; returns (mode, tables, inp, samp, lora_groups) of
    each."""
    captured = []
    dispatch = engine.runner.dispatch

    def spy(mode, tables, inp, samp, all_logits=False, prev_tokens=None, lora_groups=()):
        captured.append((mode, tables, inp, samp, tuple(lora_groups)))
        return dispatch(mode, tables, inp, samp, all_logits, prev_tokens, lora_groups)

    engine.runner.dispatch = spy
    try:
        run()
    finally:
        engine.runner.dispatch = dispatch
    return captured


def compiled_steps(engine, run) -> list[tuple[str, str]]:
    """Call ``run()`` with the engine's step dispatches recorded; returns (mode, compiled HLO text) of each."""
    return [(mode, engine.runner.lower(mode, tables, inp, samp, lora_groups=groups).compile().as_text())
            for mode, tables, inp, samp, groups in dispatched_steps(engine, run)]
