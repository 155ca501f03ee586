"""adapter_config.json is untrusted input: hostile regexes, nesting and scales are refused quickly with an
AdapterError that names the problem, and ordinary patterns keep peft's meaning."""

import json
import math
import subprocess
import sys
import textwrap

import pytest

from slora_jax.adapters.peft import MAX_LORA_SCALE, _pattern_value, _targets, load_peft_adapter, read_adapter_config
from slora_jax.config import MODULES
from slora_jax.errors import AdapterError
from slora_jax.model.random_checkpoint import tiny_llama_config, write_random_adapter

CFG = tiny_llama_config()
KEYS = [f"model.layers.{i}.{'self_attn' if m.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{m}"
        for i in range(CFG.num_layers) for m in MODULES]
# Exponential for a backtracking engine on every module key (none ends in "z"): peft's re would never return.
EVIL = "(.*)*(.*)*(.*)*z"


@pytest.fixture
def adapter(tmp_path):
    return write_random_adapter(tmp_path / "a", CFG, rank=4, alpha=8, target_modules=MODULES, seed=3)


def edit_config(d, **changes):
    path = d / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


# -------------------------------------------------------------------------------------------- regexes

HOSTILE_FIELDS = [
    ("target_modules", EVIL),
    ("exclude_modules", EVIL),
    ("layers_pattern", EVIL),
    ("rank_pattern", {EVIL: 2}),
    ("alpha_pattern", {EVIL: 2}),
]


def test_hostile_patterns_are_matched_in_linear_time(adapter):
    """Each field with a catastrophic-backtracking pattern: answered in well under a second, in a child
    process so that a regression shows as a timeout rather than a hung test run."""
    script = textwrap.dedent("""
        import json, shutil, sys, time
        from pathlib import Path
        from slora_jax.adapters.peft import read_adapter_config
        from slora_jax.errors import AdapterError
        from slora_jax.model.random_checkpoint import tiny_llama_config
        src, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
        for field, value in cases:
            d = src.parent / ("copy_" + field)
            shutil.copytree(src, d)
            cfg = json.loads((d / "adapter_config.json").read_text())
            cfg[field] = value
            if field == "layers_pattern":
                cfg["layers_to_transform"] = [0]
            (d / "adapter_config.json").write_text(json.dumps(cfg))
            t0 = time.perf_counter()
            try:
                read_adapter_config(d, tiny_llama_config(), 64)
                outcome = "loaded"
            except AdapterError as e:
                outcome = "AdapterError: " + str(e)
            print(json.dumps([field, outcome, time.perf_counter() - t0]), flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(adapter), json.dumps(HOSTILE_FIELDS)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r[0] for r in results] == [f for f, _ in HOSTILE_FIELDS]
    for field, outcome, seconds in results:
        assert seconds < 1.0, (field, seconds)
    outcomes = {f: o for f, o, _ in results}
    # Matching nothing is an error for target_modules; elsewhere the pattern simply does not apply.
    assert "matches none of the projections" in outcomes["target_modules"]
    assert outcomes["exclude_modules"] == "loaded"
    assert outcomes["rank_pattern"] == "loaded" and outcomes["alpha_pattern"] == "loaded"
    # layers_pattern that matches no key filters out every layer, so nothing is targeted.
    assert "matches none of the projections" in outcomes["layers_pattern"]


@pytest.mark.parametrize("field, value", [
    ("target_modules", r"(q)_proj\1"),
    ("exclude_modules", r"(?=model).*q_proj"),
    ("layers_pattern", r"(?<=model\.)layers"),
    ("rank_pattern", {r"(v)\1_proj": 2}),
    ("alpha_pattern", {r"(?!x)q_proj": 2}),
])
def test_patterns_re2_refuses_are_named(adapter, field, value):
    extra = {"layers_to_transform": [0]} if field == "layers_pattern" else {}
    edit_config(adapter, **{field: value}, **extra)
    pattern = value if isinstance(value, str) else next(iter(value))
    with pytest.raises(AdapterError) as e:
        read_adapter_config(adapter, CFG, 64)
    message = str(e.value)
    assert field in message and repr(pattern) in message and "RE2" in message, message


def _peft_config(**kw):
    from peft import LoraConfig
    return LoraConfig(task_type="CAUSAL_LM", **kw)


def _normalised(kw):
    cfg = {"peft_type": "LORA", "r": kw.get("r", 8), "lora_alpha": kw.get("lora_alpha", 8), "rank_pattern": {},
           "alpha_pattern": {}}
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("kw", [
    dict(target_modules=r".*\.layers\.0\.self_attn\.(q|k|o)_proj|.*\.mlp\.up_proj"),
    dict(target_modules=r"model\.layers\.\d+\.(self_attn|mlp)\.(q|down)_proj"),
    dict(target_modules=r".*(gate|up)_proj"),
    dict(target_modules=r"q_proj"),  # a string matches whole keys only
    dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.1\..*"),
    dict(target_modules=["o_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers"),
    dict(target_modules=["o_proj", "down_proj"], layers_to_transform=0, layers_pattern=["blocks", "layers"]),
    dict(target_modules=["k_proj"], layers_to_transform=[0], layers_pattern="lay.rs"),
    dict(target_modules=["k_proj"], layers_to_transform=[1]),
])
def test_target_rules_match_peft(kw):
    from peft.tuners.tuners_utils import check_target_module_exists

    peft_cfg = _peft_config(**kw)
    for key in KEYS:
        assert _targets(_normalised(kw), key) == bool(check_target_module_exists(peft_cfg, key)), key


@pytest.mark.parametrize("table", [
    {"q_proj": 1, "layers.1.mlp.down_proj": 2, "gate": 3},
    {r"layers\.\d\.self_attn\.[qk]_proj": 5, "v_proj": 6},
    {"model.layers.0.mlp.up_proj": 7, r"mlp\..*": 8},
    {"proj": 9, "up_proj|down_proj": 10},
])
def test_rank_and_alpha_patterns_match_peft(table):
    from peft.utils.other import get_pattern_key

    for key in KEYS:
        found = get_pattern_key(list(table), key)
        assert _pattern_value(table, key, "default", "rank_pattern key") == table.get(found, "default"), key


# -------------------------------------------------------------------------------------------- nesting

def test_deeply_nested_config_is_an_adapter_error(adapter):
    (adapter / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterError, match="nested too deeply"):
        read_adapter_config(adapter, CFG, 64)
    (adapter / "adapter_config.json").write_text('{"a": ' * 50_000 + "1" + "}" * 50_000)
    with pytest.raises(AdapterError, match="nested too deeply"):
        load_peft_adapter(adapter, CFG, 64, "x")


# -------------------------------------------------------------------------------------------- scales

@pytest.mark.parametrize("changes, alpha, scale", [  # the adapter has r=4
    (dict(lora_alpha=1e30), 1e30, "2.5e+29"),
    (dict(lora_alpha=-1e30), -1e30, "-2.5e+29"),
    (dict(alpha_pattern={"v_proj": 1e25}), 1e25, "2.5e+24"),
    (dict(lora_alpha=1e21, use_rslora=True), 1e21, "5e+20"),  # alpha / sqrt(r)
])
def test_scales_that_overflow_are_refused(adapter, changes, alpha, scale):
    edit_config(adapter, **changes)
    for call in (lambda: read_adapter_config(adapter, CFG, 64), lambda: load_peft_adapter(adapter, CFG, 64, "x")):
        with pytest.raises(AdapterError) as e:
            call()
        message = str(e.value)
        assert "scale" in message and "overflow" in message, message
        assert repr(alpha) in message and scale in message, message


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_alphas_are_refused(adapter, literal):
    path = adapter / "adapter_config.json"
    text = json.dumps(dict(json.loads(path.read_text()), lora_alpha="ALPHA")).replace('"ALPHA"', literal)
    path.write_text(text)
    with pytest.raises(AdapterError, match=r"lora_alpha must be a finite number, got (nan|inf|-inf)"):
        read_adapter_config(adapter, CFG, 64)


def test_large_but_usable_scale_loads(adapter):
    edit_config(adapter, lora_alpha=1e6)
    lw = load_peft_adapter(adapter, CFG, 64, "x")
    assert math.isclose(float(lw.modules["q_proj"].scales[0]), 1e6 / 4, rel_tol=1e-6)
    assert MAX_LORA_SCALE > 1e18  # sqrt(float32 max): the bound is about overflow, not taste


@pytest.mark.parametrize("dtype, refused", [("float16", True), ("bfloat16", False), ("float32", False)])
def test_the_scale_bound_follows_the_engine_dtype(adapter, dtype, refused):
    """alpha 4e5 / r 4 = 1e5 overflows float16 (largest 65504); bfloat16 has float32's range."""
    edit_config(adapter, lora_alpha=4e5)
    calls = (lambda: read_adapter_config(adapter, CFG, 64, dtype), lambda: load_peft_adapter(adapter, CFG, 64, "x",
                                                                                             dtype))
    for call in calls:
        if not refused:
            call()
            continue
        with pytest.raises(AdapterError) as e:
            call()
        message = str(e.value)
        assert "1e+05" in message and "400000.0" in message and "float16" in message and "overflow" in message
